//! Our own CPU kernels as candle custom ops, where candle is slow. Each has a plain-candle
//! reference that the tests compare it against.

pub mod im2col;
