//! The parallel runtime: how ranks are laid out (`layout`); the communicators and the model wiring
//! join it in later increments.

pub mod layout;
