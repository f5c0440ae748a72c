//! The paper's experiments as library code, behind `kfrtrl experiment`:
//! - [`variance`]: the gradient-noise experiment (KF-RTRL.md §6.1): the relative variance
//!   `E‖ĝ−g‖²/‖g‖²` of KF-RTRL's and UORO's gradient estimates against exact RTRL, over time and
//!   over the hidden size, on a contracting tanh RNN with fixed random weights;
//! - [`copy`]: the copy (string memorisation) task with the curriculum of KF-RTRL.md §6.2;
//! - [`plot`]: SVG/PNG line plots of their results.

pub mod copy;
pub mod plot;
pub mod variance;
