//! The NBD frontend: [`proto`] is the wire format and handshake, [`conn`] one
//! connection's transmission loop (with [`spec`], which receives runs of
//! writes straight into aligned buffers), [`server`] the listener and its
//! threads, [`kernel`] the kernel's NBD client attached to our server.

pub mod conn;
pub mod kernel;
pub mod proto;
pub mod server;
pub mod spec;
