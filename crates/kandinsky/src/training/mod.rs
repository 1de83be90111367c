//! Training our own small Kandinsky: the synthetic world it learns ([`shapes`]) and the pixel
//! analyser that scores generated images ([`analyser`]).

pub mod analyser;
pub mod shapes;
