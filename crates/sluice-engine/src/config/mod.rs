//! Flow files: parsing with locations, interpolation, validation against component specs, and the
//! validated model the builder consumes.

pub mod diag;
pub mod interpolate;
pub mod load;
pub mod model;
pub mod node;
pub mod validate;

pub use diag::{Diagnostic, Diagnostics};
pub use load::{load, load_with};
pub use model::{ComponentUse, FlowDef, Project, TestDef};
