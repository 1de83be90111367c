//! Training our own small Kandinsky: the synthetic world it learns ([`shapes`]), the pixel
//! analyser that scores generated images ([`analyser`]), the optimizer and checkpoints, and one
//! module per stage.

pub mod analyser;
pub mod assemble;
pub mod checkpoint;
pub mod clip;
pub mod eval;
pub mod mclip;
pub mod movq;
pub mod optim;
pub mod prior;
pub mod shapes;
pub mod threads;
pub mod tokenizer;
pub mod trainer;
pub mod unet;
