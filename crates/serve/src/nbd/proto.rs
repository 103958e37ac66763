//! The NBD protocol's wire format and the fixed-newstyle handshake
//! (`NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`,
//! `NBD_OPT_ABORT`), generic over `Read + Write` so it is tested on buffers.

use std::io::{self, Read, Write};

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Info types.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;

/// Largest read or write payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest option payload read during the handshake.
const MAX_OPTION: u32 = 64 << 10;

/// What the server offers.
#[derive(Debug, Clone)]
pub struct Export {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
    /// Preferred block size (direct-I/O alignment of the devices).
    pub preferred_block: u32,
}

impl Export {
    pub fn transmission_flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_CAN_MULTI_CONN;
        if self.read_only {
            f |= TF_READ_ONLY;
        }
        f
    }
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// The client chose the export: go to transmission.
    Transmission,
    /// The client left (NBD_OPT_ABORT, or an unknown export by EXPORT_NAME).
    Closed,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn reply(w: &mut impl Write, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(20 + data.len());
    m.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m)
}

fn reply_err(w: &mut impl Write, opt: u32, typ: u32, msg: &str) -> io::Result<()> {
    reply(w, opt, typ, msg.as_bytes())
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Run the server side of the fixed-newstyle handshake.
pub fn handshake<S: Read + Write>(s: &mut S, export: &Export) -> io::Result<Handshake> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(NBDMAGIC);
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;
    let client_flags = read_u32(s)?;
    if client_flags & !3 != 0 {
        return Err(invalid("unknown client flags"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        if u64::from_be_bytes(head[0..8].try_into().unwrap_or_default()) != IHAVEOPT {
            return Err(invalid("option without IHAVEOPT magic"));
        }
        let opt = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
        if len > MAX_OPTION {
            return Err(invalid("option payload too long"));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                if !export.matches(&data) {
                    return Ok(Handshake::Closed);
                }
                let mut m = Vec::with_capacity(10 + 124);
                m.extend_from_slice(&export.size.to_be_bytes());
                m.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    m.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&m)?;
                s.flush()?;
                return Ok(Handshake::Transmission);
            }
            OPT_ABORT => {
                // The client may already have closed; ignore a failed ACK.
                let _ = reply(s, opt, REP_ACK, &[]);
                let _ = s.flush();
                return Ok(Handshake::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(s, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                } else {
                    let mut d = (export.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(s, opt, REP_SERVER, &d)?;
                    reply(s, opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => reply_err(s, opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO")?,
                Some((name, _)) if !export.matches(name) => reply_err(
                    s,
                    opt,
                    REP_ERR_UNKNOWN,
                    &format!(
                        "no export named '{}' (this server serves '{}')",
                        String::from_utf8_lossy(name),
                        export.name
                    ),
                )?,
                Some((_, infos)) => {
                    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                    d.extend_from_slice(&export.size.to_be_bytes());
                    d.extend_from_slice(&export.transmission_flags().to_be_bytes());
                    reply(s, opt, REP_INFO, &d)?;
                    if infos.contains(&INFO_NAME) {
                        let mut d = INFO_NAME.to_be_bytes().to_vec();
                        d.extend_from_slice(export.name.as_bytes());
                        reply(s, opt, REP_INFO, &d)?;
                    }
                    if infos.contains(&INFO_DESCRIPTION) {
                        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        d.extend_from_slice(export.description.as_bytes());
                        reply(s, opt, REP_INFO, &d)?;
                    }
                    // Block sizes: any alignment works (unaligned requests take
                    // the buffered path), the devices prefer their direct-I/O size.
                    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    d.extend_from_slice(&1u32.to_be_bytes());
                    d.extend_from_slice(&export.preferred_block.to_be_bytes());
                    d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    reply(s, opt, REP_INFO, &d)?;
                    reply(s, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        s.flush()?;
                        return Ok(Handshake::Transmission);
                    }
                }
            },
            _ => reply_err(s, opt, REP_ERR_UNSUP, "option not supported by devpool")?,
        }
        s.flush()?;
    }
}

/// `u32 name length, name, u16 count, count × u16 info types`.
fn parse_info_request(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let rest = &d[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..2 + 2 * n)?;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    Some((
        name,
        list.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// A transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<RequestHeader> {
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(b[r].try_into().unwrap_or_default());
        let be16 =
            |r: std::ops::Range<usize>| u16::from_be_bytes(b[r].try_into().unwrap_or_default());
        let be64 =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or_default());
        if be32(0..4) != REQUEST_MAGIC {
            return None;
        }
        Some(RequestHeader {
            flags: be16(4..6),
            typ: be16(6..8),
            handle: be64(8..16),
            offset: be64(16..24),
            len: be32(24..28),
        })
    }

    /// The header's wire bytes (what a client sends; [`RequestHeader::parse`]
    /// reads them back).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

pub fn simple_reply(errno: u32, handle: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    r[4..8].copy_from_slice(&errno.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r
}

/// Map a Linux errno to the NBD error values (the protocol has its own
/// small set; anything else becomes EIO).
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => 1,
        libc::ENOMEM => 12,
        libc::EINVAL => 22,
        libc::ENOSPC | libc::EDQUOT => 28,
        libc::EOVERFLOW => 75,
        libc::EOPNOTSUPP => 95,
        libc::ESHUTDOWN => 108,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted peer: reads come from `input`, writes go to `output`.
    struct Peer {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Peer {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Peer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn export() -> Export {
        Export {
            name: "vol".into(),
            description: "d".into(),
            size: 1 << 20,
            read_only: false,
            preferred_block: 4096,
        }
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    fn go(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        opt(OPT_GO, &d)
    }

    fn run(client: Vec<u8>) -> (io::Result<Handshake>, Vec<u8>) {
        let mut p = Peer {
            input: io::Cursor::new(client),
            output: Vec::new(),
        };
        let r = handshake(&mut p, &export());
        (r, p.output)
    }

    /// The option replies after the 18-byte greeting: (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut b = &out[18..];
        while b.len() >= 20 {
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((
                u32::from_be_bytes(b[8..12].try_into().unwrap()),
                u32::from_be_bytes(b[12..16].try_into().unwrap()),
                b[20..20 + len].to_vec(),
            ));
            b = &b[20 + len..];
        }
        v
    }

    #[test]
    fn go_with_the_default_name_reports_size_flags_and_block_sizes() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(go("", &[INFO_BLOCK_SIZE]));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), Handshake::Transmission);
        assert_eq!(&out[0..8], NBDMAGIC);
        let reps = replies(&out);
        assert_eq!(reps[0].1, REP_INFO);
        assert_eq!(&reps[0].2[2..10], &(1u64 << 20).to_be_bytes());
        let flags = u16::from_be_bytes([reps[0].2[10], reps[0].2[11]]);
        assert_ne!(flags & TF_CAN_MULTI_CONN, 0);
        assert_eq!(reps[1].2[0..2], INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(reps.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn unknown_exports_and_options_get_errors_and_the_handshake_goes_on() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(go("other", &[]));
        c.extend(opt(99, b"x"));
        c.extend(opt(OPT_LIST, &[]));
        c.extend(opt(OPT_ABORT, &[]));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), Handshake::Closed);
        let types: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_SERVER, REP_ACK, REP_ACK]
        );
    }

    #[test]
    fn malformed_and_oversized_options_are_errors_not_panics() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(opt(OPT_GO, &[0, 0, 0, 9, b'a']));
        c.extend(opt(OPT_ABORT, &[]));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), Handshake::Closed);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        let mut big = 3u32.to_be_bytes().to_vec();
        big.extend(IHAVEOPT.to_be_bytes());
        big.extend(OPT_GO.to_be_bytes());
        big.extend(u32::MAX.to_be_bytes());
        assert!(run(big).0.is_err());
        assert!(run(vec![0, 0]).0.is_err());
    }

    #[test]
    fn export_name_without_zeroes_sends_ten_bytes() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXPORT_NAME, b"vol"));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), Handshake::Transmission);
        assert_eq!(out.len(), 18 + 10);
        let mut c = 1u32.to_be_bytes().to_vec();
        c.extend(opt(OPT_EXPORT_NAME, b"vol"));
        assert_eq!(run(c).1.len(), 18 + 134);
    }

    #[test]
    fn request_headers_need_the_magic() {
        let mut b = [0u8; REQUEST_LEN];
        assert!(RequestHeader::parse(&b).is_none());
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[24..28].copy_from_slice(&4096u32.to_be_bytes());
        let h = RequestHeader::parse(&b).unwrap();
        assert_eq!((h.typ, h.len), (CMD_WRITE, 4096));
        assert_eq!(h.encode(), b, "encode is parse's inverse");
        let all = RequestHeader {
            flags: 0x0102,
            typ: 0x0304,
            handle: 0x0506_0708_090a_0b0c,
            offset: 0x0d0e_0f10_1112_1314,
            len: 0x1516_1718,
        };
        assert_eq!(RequestHeader::parse(&all.encode()), Some(all));
    }
}
