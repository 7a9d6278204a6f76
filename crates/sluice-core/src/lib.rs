//! The small, stable plugin API of Sluice.
//!
//! Everything a connector or processor needs and nothing it does not: the [`Message`] that flows
//! through a route, the [`ack`] handles that carry at-least-once delivery from a source to every
//! sink, the [`Source`]/[`Processor`]/[`Sink`] traits, the [`spec::ComponentSpec`] that is the single
//! source of truth for a component's configuration, and the explicit [`Registry`].
//!
//! This crate depends on no other Sluice crate (see ARCHITECTURE.md).

pub mod ack;
pub mod bytesize;
pub mod component;
pub mod duration;
pub mod error;
pub mod health;
pub mod message;
pub mod registry;
pub mod resources;
pub mod spec;
pub mod state;

pub use ack::{AckToken, Outcome};
pub use component::{
    Admitted, BuildContext, Dispatch, Outputs, Processor, Sink, Source, SourceContext, StepBuilder,
};
pub use error::{BuildError, ErrorKind, Failure, ProcessError, SourceError};
pub use health::{ComponentHealth, HealthHandle};
pub use message::{Body, ExchangePattern, Headers, Message, Metadata};
pub use registry::Registry;
pub use resources::Resources;
