//! Expression languages: jq (via jaq) and text templates (via minijinja).
//!
//! Both are compiled once when a flow loads and evaluated per message under limits (time or fuel,
//! output size), so a bad expression fails its step instead of stalling the runtime.

pub mod jq;
pub mod template;
mod view;

pub use view::MetaView;
