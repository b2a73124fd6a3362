//! What the fuzz targets share: reading the fuzz input as a hostile guest's decisions,
//! an `MsiVectors` that checks the routing protocol it is told, and a split-ring driver
//! writing descriptor tables and available rings into guest RAM.
//!
//! Every target drives the project's real code through the interfaces the VMM uses; a
//! target fails by panicking (an `assert!` on an invariant, or the code under test).

pub mod bars;
pub mod driver;
pub mod input;
pub mod vectors;

pub use input::Input;
