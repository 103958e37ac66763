//! Any bytes a client sends during the NBD handshake, and any request header,
//! give a result or an error, never a panic.
#![no_main]
use devpool_serve::nbd::proto::{Export, RequestHeader, REQUEST_LEN, handshake};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};

struct Peer(Cursor<Vec<u8>>);
impl Read for Peer {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(b)
    }
}
impl Write for Peer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let export = Export {
        name: "vol".into(),
        description: "fuzz".into(),
        size: 1 << 30,
        read_only: false,
        preferred_block: 4096,
    };
    let _ = handshake(&mut Peer(Cursor::new(data.to_vec())), &export);
    if data.len() >= REQUEST_LEN {
        let mut h = [0u8; REQUEST_LEN];
        h.copy_from_slice(&data[..REQUEST_LEN]);
        let _ = RequestHeader::parse(&h);
    }
});
