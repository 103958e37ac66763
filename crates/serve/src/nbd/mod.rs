//! The NBD frontend: [`proto`] is the wire format and handshake, [`conn`] one
//! connection's transmission loop, [`server`] the listener and its threads,
//! [`kernel`] the kernel's NBD client attached to our server.

pub mod conn;
pub mod kernel;
pub mod proto;
pub mod server;
