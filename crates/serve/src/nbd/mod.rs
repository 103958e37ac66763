//! The NBD frontend: [`proto`] is the wire format and handshake, [`conn`] one
//! connection's transmission loop, [`server`] the listener and its threads.

pub mod conn;
pub mod proto;
pub mod server;
