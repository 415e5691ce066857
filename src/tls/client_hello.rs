//! ClientHello inspection without terminating TLS.
//!
//! The passthrough listener must learn the SNI and the offered ALPN protocols before it
//! can pick a route, yet it must forward the client's bytes unchanged. [`parse_client_hello`]
//! looks at everything received so far and answers one of three things: the ClientHello
//! is complete, more bytes are needed, or the bytes are not a TLS ClientHello (with a typed
//! reason). It is pure — no I/O — so the caller decides how long to wait and how much to
//! buffer ([`MAX_CLIENT_HELLO_BYTES`]).
//!
//! Unlike parsers that assume one TLS record, this one reassembles a ClientHello that the
//! client fragmented over several records (large post-quantum key shares make that real).
//! When the ClientHello fits in one record — the usual case — nothing is allocated.

use std::borrow::Cow;
use std::ops::Range;

/// The most bytes the gateway buffers while waiting for a complete ClientHello: record
/// headers plus the handshake message. A ClientHello that needs more is [`NotTls::TooLarge`].
pub const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;

/// The most TLS records a ClientHello may be fragmented over. Real clients use one to five
/// (16 KiB each); the parser re-walks the record headers on every call, so a client
/// trickling one-byte records must not make each call walk thousands of them.
pub const MAX_CLIENT_HELLO_RECORDS: usize = 256;

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

const CONTENT_TYPE_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const SERVER_NAME_HOST_NAME: u8 = 0;
/// RFC 6066 §3 / RFC 1035: a host name is at most 255 bytes on the wire (253 in text form).
const MAX_HOST_NAME_LEN: usize = 255;

/// The answer of [`parse_client_hello`] for the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloParse<'a> {
    /// A whole ClientHello was read; `record_bytes()` says how much of the buffer it used.
    Complete(ClientHello<'a>),
    /// The bytes so far are a valid beginning of a ClientHello; read more and call again.
    NeedMore,
    /// The bytes are not a TLS ClientHello this gateway can route; close the connection.
    NotTls(NotTls),
}

/// Why the received bytes are not a routable TLS ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotTls {
    /// The first byte is no TLS content type at all (plaintext HTTP, a different protocol).
    #[error(
        "first byte 0x{first_byte:02x} is not a TLS record type; the client is not speaking TLS (plaintext sent to a TLS passthrough port?)"
    )]
    NotTlsRecord { first_byte: u8 },
    /// A TLS record, but not a handshake record (alert, application data, ...).
    #[error(
        "TLS record of content type {content_type} where a handshake record (22) carrying a ClientHello was expected"
    )]
    NotHandshake { content_type: u8 },
    /// An SSL 2.0-compatible ClientHello, which carries no extensions and so no SNI.
    #[error("SSLv2-format ClientHello: it cannot carry SNI; the client must use TLS 1.2 or later")]
    Sslv2Hello,
    /// The record's legacy version is outside TLS 1.0 (0x0301) ..= TLS 1.3 (0x0304).
    #[error(
        "TLS record version 0x{version:04x} is not between 0x0301 (TLS 1.0) and 0x0304; SSL 3.0 and unknown versions are refused"
    )]
    BadRecordVersion { version: u16 },
    /// A handshake message other than ClientHello opened the connection.
    #[error("handshake message type {msg_type} where a ClientHello (1) was expected")]
    NotClientHello { msg_type: u8 },
    /// The ClientHello (with its record headers) would need more than [`MAX_CLIENT_HELLO_BYTES`].
    #[error(
        "ClientHello needs {needed} bytes, more than the {MAX_CLIENT_HELLO_BYTES}-byte limit the gateway buffers"
    )]
    TooLarge { needed: usize },
    /// The ClientHello is fragmented over more than [`MAX_CLIENT_HELLO_RECORDS`] records.
    #[error(
        "ClientHello fragmented over more than {MAX_CLIENT_HELLO_RECORDS} TLS records; clients send it in 16 KiB records"
    )]
    TooManyRecords,
    /// Lengths or fields inside the records or the ClientHello are inconsistent.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

impl NotTls {
    /// A short snake_case label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            NotTls::NotTlsRecord { .. } => "not_tls",
            NotTls::NotHandshake { .. } => "not_handshake",
            NotTls::Sslv2Hello => "sslv2_hello",
            NotTls::BadRecordVersion { .. } => "bad_record_version",
            NotTls::NotClientHello { .. } => "not_client_hello",
            NotTls::TooLarge { .. } => "too_large",
            NotTls::TooManyRecords => "too_many_records",
            NotTls::Malformed(_) => "malformed",
        }
    }
}

/// A parsed ClientHello: the handshake message body plus where SNI and ALPN sit inside it.
///
/// The body borrows from the caller's buffer when the ClientHello came in one record and is
/// reassembled (owned) when it was fragmented over several.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    body: Cow<'a, [u8]>,
    record_bytes: usize,
    records: usize,
    legacy_version: u16,
    /// Range of the validated host name inside `body`.
    sni: Option<Range<usize>>,
    /// Range of the validated ALPN `protocol_name_list` contents inside `body`.
    alpn: Option<Range<usize>>,
}

impl ClientHello<'_> {
    /// The `host_name` of the server_name extension, if the client sent one. It has been
    /// checked to contain only ASCII letters, digits, `-`, `.` and `_`.
    pub fn sni(&self) -> Option<&str> {
        let range = self.sni.clone()?;
        // Validated as ASCII at parse time, so this conversion cannot fail.
        std::str::from_utf8(self.body.get(range)?).ok()
    }

    /// The offered ALPN protocols, in the client's order of preference.
    pub fn alpn(&self) -> Alpn<'_> {
        let list = match &self.alpn {
            Some(range) => self.body.get(range.clone()).unwrap_or_default(),
            None => &[],
        };
        Alpn { rest: list }
    }

    /// Whether the client sent an ALPN extension (validation guarantees it is non-empty).
    pub fn alpn_offered(&self) -> bool {
        self.alpn.is_some()
    }

    /// Whether any offered protocol is in `allowed`; an empty `allowed` allows anything,
    /// including a ClientHello without ALPN.
    pub fn offers_any_alpn(&self, allowed: &[String]) -> bool {
        allowed.is_empty()
            || self
                .alpn()
                .any(|offered| allowed.iter().any(|a| a.as_bytes() == offered))
    }

    /// The offered protocols joined with `,` for logs (`istio,h2`), or `-` if none.
    pub fn alpn_display(&self) -> String {
        let mut out = String::new();
        for (i, proto) in self.alpn().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&String::from_utf8_lossy(proto));
        }
        if out.is_empty() {
            out.push('-');
        }
        out
    }

    /// How many bytes at the start of the buffer belong to the records carrying this
    /// ClientHello. Bytes after this (if any) are the client's next records.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    /// How many TLS records carried the ClientHello.
    pub fn record_count(&self) -> usize {
        self.records
    }

    /// The ClientHello's `legacy_version` field (0x0303 for TLS 1.2 and 1.3 clients).
    pub fn legacy_version(&self) -> u16 {
        self.legacy_version
    }

    /// The handshake message body (after the 4-byte handshake header).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Detach from the receive buffer (copies the body if it was borrowed), so the buffer
    /// can be handed on while the parsed hello is kept.
    pub fn into_owned(self) -> ClientHello<'static> {
        ClientHello {
            body: Cow::Owned(self.body.into_owned()),
            record_bytes: self.record_bytes,
            records: self.records,
            legacy_version: self.legacy_version,
            sni: self.sni,
            alpn: self.alpn,
        }
    }
}

impl std::fmt::Debug for ClientHello<'_> {
    // The body can be 64 KiB of key shares and padding; show what a reader needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHello")
            .field("sni", &self.sni())
            .field("alpn", &self.alpn_display())
            .field("body_len", &self.body.len())
            .field("record_bytes", &self.record_bytes)
            .field("records", &self.records)
            .finish()
    }
}

/// Iterator over offered ALPN protocol names; see [`ClientHello::alpn`].
#[derive(Debug, Clone)]
pub struct Alpn<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Alpn<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // The list was validated at parse time; a short list simply ends the iteration.
        let (&len, tail) = self.rest.split_first()?;
        let len = usize::from(len);
        let proto = tail.get(..len)?;
        self.rest = tail.get(len..).unwrap_or_default();
        Some(proto)
    }
}

/// Inspect everything received so far from a client and say whether it holds a complete
/// TLS ClientHello. Call again with a longer buffer after [`HelloParse::NeedMore`].
///
/// Decisions are made as early as the bytes allow: a non-TLS first byte or a declared length
/// over [`MAX_CLIENT_HELLO_BYTES`] is refused without waiting for the rest.
pub fn parse_client_hello(buf: &[u8]) -> HelloParse<'_> {
    match locate(buf) {
        Ok(Some(located)) => match parse_body(buf, located) {
            Ok(hello) => HelloParse::Complete(hello),
            Err(e) => HelloParse::NotTls(e),
        },
        Ok(None) => HelloParse::NeedMore,
        Err(e) => HelloParse::NotTls(e),
    }
}

/// Where the ClientHello body lies in the buffer once all its records are present.
struct Located {
    /// Length of the handshake body (without the 4-byte handshake header).
    body_len: usize,
    /// End of the last record carrying the ClientHello.
    record_bytes: usize,
    records: usize,
}

/// Walk the records at the start of `buf`, validating headers, until the whole handshake
/// message is covered. `Ok(None)` means the buffer ends first.
fn locate(buf: &[u8]) -> Result<Option<Located>, NotTls> {
    let mut pos = 0;
    let mut records = 0;
    // Handshake header bytes collected so far; they may themselves span records.
    let mut hs_header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut hs_seen = 0usize;
    // Total handshake bytes (header + body) once the header is known.
    let mut hs_total: Option<usize> = None;

    loop {
        if records == MAX_CLIENT_HELLO_RECORDS {
            return Err(NotTls::TooManyRecords);
        }
        let Some(payload_len) = record_header(buf.get(pos..).unwrap_or_default(), records == 0)?
        else {
            return Ok(None);
        };
        let record_end = pos + RECORD_HEADER_LEN + payload_len;
        if record_end > MAX_CLIENT_HELLO_BYTES {
            return Err(NotTls::TooLarge { needed: record_end });
        }
        // The fragment bytes available now (the record may still be arriving).
        let frag_start = pos + RECORD_HEADER_LEN;
        let available = buf
            .get(frag_start..record_end.min(buf.len()))
            .unwrap_or_default();

        // Feed the handshake header from this fragment as far as it goes.
        if hs_total.is_none() {
            for (&b, slot) in available.iter().zip(hs_header.iter_mut().skip(hs_seen)) {
                *slot = b;
                hs_seen += 1;
                if hs_seen == 1 && b != HANDSHAKE_CLIENT_HELLO {
                    return Err(NotTls::NotClientHello { msg_type: b });
                }
            }
            if hs_seen == HANDSHAKE_HEADER_LEN {
                let [_, b1, b2, b3] = hs_header;
                let body_len = usize::from(b1) << 16 | usize::from(b2) << 8 | usize::from(b3);
                let total = HANDSHAKE_HEADER_LEN + body_len;
                // Even packed into the fewest records this cannot fit under the cap.
                let min_records = total.div_ceil(MAX_RECORD_PAYLOAD).max(1);
                let needed = total + min_records * RECORD_HEADER_LEN;
                if needed > MAX_CLIENT_HELLO_BYTES {
                    return Err(NotTls::TooLarge { needed });
                }
                hs_total = Some(total);
            }
        }
        if record_end > buf.len() {
            return Ok(None);
        }
        records += 1;
        pos = record_end;

        if let Some(total) = hs_total {
            let collected = pos - records * RECORD_HEADER_LEN;
            if collected >= total {
                if collected > total {
                    // A ClientHello is the client's only handshake message before the
                    // server answers; anything after it in the same record is a protocol error.
                    return Err(NotTls::Malformed(
                        "data after the ClientHello in its record",
                    ));
                }
                return Ok(Some(Located {
                    body_len: total - HANDSHAKE_HEADER_LEN,
                    record_bytes: pos,
                    records,
                }));
            }
        }
    }
}

/// Validate the record header at the start of `rest` as far as it is present and return
/// the payload length once the header is complete.
fn record_header(rest: &[u8], first: bool) -> Result<Option<usize>, NotTls> {
    let content_type = rest.first().copied();
    if content_type.is_some_and(|t| t != CONTENT_TYPE_HANDSHAKE) {
        if !first {
            // RFC 8446 §5.1: handshake messages must not be interleaved with other records.
            return Err(NotTls::Malformed(
                "non-handshake record inside a fragmented ClientHello",
            ));
        }
        return Err(classify_first_byte(rest));
    }
    // Check the version bytes as soon as each arrives, so garbage is refused early.
    let major = rest.get(1).copied();
    let minor = rest.get(2).copied();
    if major.is_some_and(|m| m != 3) || minor.is_some_and(|m| !(1..=4).contains(&m)) {
        let version = u16::from(major.unwrap_or(0)) << 8 | u16::from(minor.unwrap_or(0));
        return Err(NotTls::BadRecordVersion { version });
    }
    let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
        return Ok(None);
    };
    let len = usize::from(hi) << 8 | usize::from(lo);
    if len == 0 {
        // RFC 8446 §5.1 forbids zero-length handshake fragments; accepting them would let a
        // client hold the connection open with headers that carry nothing.
        return Err(NotTls::Malformed("zero-length handshake record"));
    }
    if len > MAX_RECORD_PAYLOAD {
        return Err(NotTls::Malformed("record longer than 2^14 bytes"));
    }
    Ok(Some(len))
}

fn classify_first_byte(rest: &[u8]) -> NotTls {
    let first = rest.first().copied().unwrap_or(0);
    match first {
        // change_cipher_spec, alert, application_data, heartbeat
        20 | 21 | 23 | 24 => NotTls::NotHandshake {
            content_type: first,
        },
        // SSLv2 record header: high bit set, two-byte length, then msg type 1 (CLIENT-HELLO).
        // The third byte may not have arrived; the high bit alone already rules out TLS.
        b if b & 0x80 != 0 && rest.get(2).is_none_or(|&t| t == 1) => NotTls::Sslv2Hello,
        b => NotTls::NotTlsRecord { first_byte: b },
    }
}

/// Extract (or reassemble) the handshake body and parse the ClientHello fields.
fn parse_body(buf: &[u8], located: Located) -> Result<ClientHello<'_>, NotTls> {
    let body: Cow<'_, [u8]> = if located.records == 1 {
        let start = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN;
        let slice = buf
            .get(start..start + located.body_len)
            .ok_or(NotTls::Malformed(
                "record shorter than its handshake message",
            ))?;
        Cow::Borrowed(slice)
    } else {
        Cow::Owned(reassemble(buf, &located)?)
    };
    let fields = parse_fields(&body)?;
    Ok(ClientHello {
        body,
        record_bytes: located.record_bytes,
        records: located.records,
        legacy_version: fields.legacy_version,
        sni: fields.sni,
        alpn: fields.alpn,
    })
}

/// Concatenate the fragments of the located records, leaving out the handshake header.
fn reassemble(buf: &[u8], located: &Located) -> Result<Vec<u8>, NotTls> {
    let mut body = Vec::with_capacity(located.body_len);
    let mut header_left = HANDSHAKE_HEADER_LEN;
    let mut records = Reader::new(buf.get(..located.record_bytes).unwrap_or_default());
    while !records.is_empty() {
        records.skip(3, "record header")?;
        let fragment = records.u16_prefixed("record fragment")?;
        let skip = header_left.min(fragment.len());
        header_left -= skip;
        body.extend_from_slice(fragment.get(skip..).unwrap_or_default());
    }
    if body.len() != located.body_len {
        return Err(NotTls::Malformed("reassembled ClientHello length mismatch"));
    }
    Ok(body)
}

struct Fields {
    legacy_version: u16,
    sni: Option<Range<usize>>,
    alpn: Option<Range<usize>>,
}

/// Parse the ClientHello body (RFC 8446 §4.1.2; also valid for TLS 1.0–1.2 hellos).
fn parse_fields(body: &[u8]) -> Result<Fields, NotTls> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(NotTls::Malformed("ClientHello legacy_version is not 3.x"));
    }
    r.skip(32, "random")?;
    let session_id = r.u8_prefixed("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(NotTls::Malformed("legacy_session_id longer than 32 bytes"));
    }
    let suites = r.u16_prefixed("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(NotTls::Malformed("cipher_suites length is zero or odd"));
    }
    if r.u8_prefixed("legacy_compression_methods")?.is_empty() {
        return Err(NotTls::Malformed("no compression methods"));
    }
    let mut fields = Fields {
        legacy_version,
        sni: None,
        alpn: None,
    };
    // Pre-TLS 1.2 clients may omit the extensions block entirely; then there is no SNI.
    if r.is_empty() {
        return Ok(fields);
    }
    let extensions = r.u16_prefixed("extensions")?;
    if !r.is_empty() {
        return Err(NotTls::Malformed("bytes after the extensions block"));
    }
    let mut exts = Reader::new(extensions);
    while !exts.is_empty() {
        let ext_type = exts.u16("extension type")?;
        let data = exts.u16_prefixed("extension data")?;
        // Offset of `data` within `body`, to store ranges rather than borrows.
        let data_offset = body.len() - exts.remaining() - data.len();
        match ext_type {
            EXT_SERVER_NAME => {
                if fields.sni.is_some() {
                    return Err(NotTls::Malformed("duplicate server_name extension"));
                }
                fields.sni = Some(parse_server_name(data, data_offset)?);
            }
            EXT_ALPN => {
                if fields.alpn.is_some() {
                    return Err(NotTls::Malformed("duplicate ALPN extension"));
                }
                fields.alpn = Some(parse_alpn(data, data_offset)?);
            }
            _ => {}
        }
    }
    Ok(fields)
}

/// RFC 6066 §3: `ServerName server_name_list<1..2^16-1>`; returns the host_name's range.
fn parse_server_name(data: &[u8], data_offset: usize) -> Result<Range<usize>, NotTls> {
    let mut r = Reader::new(data);
    let list = r.u16_prefixed("server_name_list")?;
    if !r.is_empty() {
        return Err(NotTls::Malformed("bytes after server_name_list"));
    }
    if list.is_empty() {
        return Err(NotTls::Malformed("empty server_name_list"));
    }
    let list_offset = data_offset + 2;
    let mut names = Reader::new(list);
    let mut host: Option<Range<usize>> = None;
    while !names.is_empty() {
        let name_type = names.u8("server name type")?;
        let name = names.u16_prefixed("server name")?;
        if name_type != SERVER_NAME_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(NotTls::Malformed("more than one host_name in server_name"));
        }
        if name.is_empty() || name.len() > MAX_HOST_NAME_LEN {
            return Err(NotTls::Malformed(
                "host_name empty or longer than 255 bytes",
            ));
        }
        // Branch-free over the bytes: this runs for every connection.
        if !name
            .iter()
            .fold(true, |ok, &c| ok & HOST_NAME_BYTE[usize::from(c)])
        {
            return Err(NotTls::Malformed(
                "host_name has characters other than letters, digits, '-', '.', '_'",
            ));
        }
        let start = list_offset + list.len() - names.remaining() - name.len();
        host = Some(start..start + name.len());
    }
    // A server_name extension with only unknown name types carries no host name.
    host.ok_or(NotTls::Malformed("server_name without a host_name entry"))
}

/// Bytes accepted in an SNI host_name: `[A-Za-z0-9._-]`. `_` is not valid in host names
/// but Istio's subset keys (`outbound_.9080_._.host`) are sent as SNI and contain it.
static HOST_NAME_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_';
        c += 1;
    }
    table
};

/// RFC 7301 §3.1: `ProtocolName protocol_name_list<2..2^16-1>`, each name `<1..2^8-1>`.
fn parse_alpn(data: &[u8], data_offset: usize) -> Result<Range<usize>, NotTls> {
    let mut r = Reader::new(data);
    let list = r.u16_prefixed("protocol_name_list")?;
    if !r.is_empty() {
        return Err(NotTls::Malformed("bytes after protocol_name_list"));
    }
    if list.is_empty() {
        return Err(NotTls::Malformed("empty ALPN protocol_name_list"));
    }
    let mut names = Reader::new(list);
    while !names.is_empty() {
        if names.u8_prefixed("ALPN protocol name")?.is_empty() {
            return Err(NotTls::Malformed("empty ALPN protocol name"));
        }
    }
    let start = data_offset + 2;
    Ok(start..start + list.len())
}

/// A bounds-checked reader: every read either succeeds within the slice or reports
/// which field ran past the end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { rest: buf }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], NotTls> {
        if n > self.rest.len() {
            return Err(NotTls::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn skip(&mut self, n: usize, what: &'static str) -> Result<(), NotTls> {
        self.take(n, what).map(drop)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, NotTls> {
        let (&b, tail) = self.rest.split_first().ok_or(NotTls::Malformed(what))?;
        self.rest = tail;
        Ok(b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, NotTls> {
        match *self.take(2, what)? {
            [hi, lo] => Ok(u16::from(hi) << 8 | u16::from(lo)),
            _ => Err(NotTls::Malformed(what)),
        }
    }

    fn u8_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], NotTls> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    fn u16_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], NotTls> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/client_hello");
    const ISTIO_SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
    const ISTIO_V2_SNI: &str = "outbound_.9080_.v2_.reviews.default.svc.cluster.local";

    /// The first flight of a real rustls client: one ClientHello record.
    fn rustls_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    fn read_vector(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DATA}/{name}")).unwrap()
    }

    /// The handshake message (header included) carried by the records in `records`.
    fn handshake_message(records: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = records;
        while rest.len() >= RECORD_HEADER_LEN {
            let len = usize::from(rest[3]) << 8 | usize::from(rest[4]);
            out.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
        }
        out
    }

    /// Wrap a handshake message in handshake records with the given fragment sizes; the
    /// last size repeats until the message is used up.
    fn into_records(message: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = message;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i.min(sizes.len() - 1)]
                .clamp(1, MAX_RECORD_PAYLOAD)
                .min(rest.len());
            out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1, (n >> 8) as u8, n as u8]);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            i += 1;
        }
        out
    }

    /// Split the ClientHello in `records` into `n` records of near-equal size.
    fn refragment(records: &[u8], n: usize) -> Vec<u8> {
        let message = handshake_message(records);
        into_records(&message, &[message.len().div_ceil(n)])
    }

    /// Append an extension to a ClientHello, fixing every enclosing length; the result is
    /// split into maximum-size records.
    fn with_extension(records: &[u8], ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut msg = handshake_message(records);
        let mut p = 4 + 2 + 32;
        p += 1 + usize::from(msg[p]);
        p += 2 + (usize::from(msg[p]) << 8 | usize::from(msg[p + 1]));
        p += 1 + usize::from(msg[p]);
        let ext_len = (usize::from(msg[p]) << 8 | usize::from(msg[p + 1])) + 4 + data.len();
        msg[p..p + 2].copy_from_slice(&(ext_len as u16).to_be_bytes());
        msg.extend_from_slice(&ext_type.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u16).to_be_bytes());
        msg.extend_from_slice(data);
        let body_len = msg.len() - 4;
        msg[1..4].copy_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        into_records(&msg, &[MAX_RECORD_PAYLOAD])
    }

    fn padded(records: &[u8], pad: usize) -> Vec<u8> {
        // 21 = padding extension (RFC 7685), as browsers and OpenSSL send it.
        with_extension(records, 21, &vec![0u8; pad])
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    fn alpn_ext(protos: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    /// A minimal hand-built ClientHello record with the given extensions (None: no block).
    fn hand_hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        if let Some(exts) = extensions {
            let mut block = Vec::new();
            for (t, d) in exts {
                block.extend_from_slice(&t.to_be_bytes());
                block.extend_from_slice(&(d.len() as u16).to_be_bytes());
                block.extend_from_slice(d);
            }
            body.extend_from_slice(&(block.len() as u16).to_be_bytes());
            body.extend_from_slice(&block);
        }
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        into_records(&msg, &[MAX_RECORD_PAYLOAD])
    }

    fn complete(buf: &[u8]) -> ClientHello<'_> {
        match parse_client_hello(buf) {
            HelloParse::Complete(h) => h,
            other => panic!("expected a complete ClientHello, got {other:?}"),
        }
    }

    fn not_tls(buf: &[u8]) -> NotTls {
        match parse_client_hello(buf) {
            HelloParse::NotTls(e) => e,
            other => panic!("expected NotTls, got {other:?}"),
        }
    }

    fn alpn_list(h: &ClientHello<'_>) -> Vec<String> {
        h.alpn()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    /// What a caller observes of a parse, comparable across fragmentations.
    fn summary(buf: &[u8]) -> Result<(Option<String>, Vec<String>, u16), String> {
        match parse_client_hello(buf) {
            HelloParse::Complete(h) => Ok((
                h.sni().map(str::to_owned),
                alpn_list(&h),
                h.legacy_version(),
            )),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn rustls_hello_with_istio_sni_and_alpn_borrows_from_one_record() {
        let buf = rustls_hello(ISTIO_SNI, &["istio-peer-exchange", "istio"]);
        let h = complete(&buf);
        assert_eq!(h.sni(), Some(ISTIO_SNI));
        assert_eq!(alpn_list(&h), ["istio-peer-exchange", "istio"]);
        assert!(h.alpn_offered());
        assert_eq!(h.alpn_display(), "istio-peer-exchange,istio");
        assert_eq!(h.record_bytes(), buf.len());
        assert_eq!(h.record_count(), 1);
        assert_eq!(h.legacy_version(), 0x0303);
        assert!(
            matches!(h.body, Cow::Borrowed(_)),
            "one record must not allocate"
        );
    }

    #[test]
    fn rustls_tls12_only_hello() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"istio".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(ISTIO_V2_SNI).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut buf = Vec::new();
        conn.write_tls(&mut buf).unwrap();
        let h = complete(&buf);
        assert_eq!(h.sni(), Some(ISTIO_V2_SNI));
        assert_eq!(h.alpn_display(), "istio");
        assert_eq!(h.legacy_version(), 0x0303);
    }

    #[test]
    fn alpn_allow_list() {
        let buf = rustls_hello(ISTIO_SNI, &["h2", "istio"]);
        let h = complete(&buf);
        let allowed = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(h.offers_any_alpn(&allowed(&["istio", "istio-peer-exchange"])));
        assert!(!h.offers_any_alpn(&allowed(&["istio-h2", "istio-http/1.1"])));
        assert!(h.offers_any_alpn(&[]));
        // "istio" must match a whole protocol, not a prefix of one.
        assert!(!h.offers_any_alpn(&allowed(&["isti", "istio-peer"])));
    }

    #[test]
    fn no_alpn_and_no_sni() {
        let buf = rustls_hello("reviews.default.svc.cluster.local", &[]);
        let h = complete(&buf);
        assert!(!h.alpn_offered());
        assert_eq!(h.alpn().count(), 0);
        assert_eq!(h.alpn_display(), "-");
        assert!(!h.offers_any_alpn(&["istio".to_string()]));
        assert!(h.offers_any_alpn(&[]));

        let buf = hand_hello(Some(&[(EXT_ALPN, alpn_ext(&[b"istio"]))]));
        let h = complete(&buf);
        assert_eq!(h.sni(), None);
        assert_eq!(h.alpn_display(), "istio");

        // A TLS 1.0-style hello without an extensions block at all.
        let buf = hand_hello(None);
        let h = complete(&buf);
        assert_eq!(h.sni(), None);
        assert!(!h.alpn_offered());
    }

    #[test]
    fn rustls_accepts_istio_subset_keys_as_dns_names() {
        for sni in [ISTIO_SNI, ISTIO_V2_SNI] {
            let buf = rustls_hello(sni, &["istio"]);
            assert_eq!(complete(&buf).sni(), Some(sni));
        }
    }

    #[test]
    fn checked_in_vectors_parse() {
        let cases: &[(&str, &str, &[&str], usize)] = &[
            (
                "rustls_tls13_istio.bin",
                ISTIO_V2_SNI,
                &["istio-peer-exchange", "istio"],
                1,
            ),
            (
                "openssl_istio.bin",
                ISTIO_SNI,
                &["istio", "istio-peer-exchange"],
                1,
            ),
            ("rustls_pq_1800.bin", ISTIO_SNI, &["istio"], 1),
            ("rustls_pq_3_records.bin", ISTIO_SNI, &["istio"], 3),
            ("large_8k.bin", ISTIO_SNI, &["istio", "h2"], 1),
        ];
        for &(file, sni, alpn, records) in cases {
            let buf = read_vector(file);
            let h = complete(&buf);
            assert_eq!(h.sni(), Some(sni), "{file}");
            assert_eq!(alpn_list(&h), alpn, "{file}");
            assert_eq!(h.record_count(), records, "{file}");
            assert_eq!(h.record_bytes(), buf.len(), "{file}");
        }
        assert!((1700..2000).contains(&read_vector("rustls_pq_1800.bin").len()));
        assert!(read_vector("large_8k.bin").len() > 8 * 1024);
    }

    #[test]
    fn fragmented_over_records_reassembles_to_the_same_hello() {
        let one = rustls_hello(ISTIO_V2_SNI, &["istio-peer-exchange", "istio"]);
        let expected = summary(&one).unwrap();
        for n in 1..=8 {
            let buf = refragment(&one, n);
            let h = complete(&buf);
            assert_eq!(h.record_count(), n);
            assert_eq!(h.record_bytes(), buf.len());
            assert_eq!(summary(&buf).unwrap(), expected, "{n} records");
        }
        // Records so small that the 4-byte handshake header itself spans records.
        let buf = into_records(&handshake_message(&one), &[1, 2, 1, 3, 7]);
        assert_eq!(summary(&buf).unwrap(), expected);
        assert!(matches!(complete(&buf).body, Cow::Owned(_)));
    }

    #[test]
    fn byte_at_a_time_needs_more_until_the_last_byte() {
        for buf in [
            rustls_hello(ISTIO_SNI, &["istio"]),
            refragment(&read_vector("rustls_pq_1800.bin"), 3),
            into_records(
                &handshake_message(&rustls_hello(ISTIO_SNI, &["istio"])),
                &[1, 1, 1, 2],
            ),
        ] {
            for end in 0..buf.len() {
                assert_eq!(
                    parse_client_hello(&buf[..end]),
                    HelloParse::NeedMore,
                    "prefix {end}"
                );
            }
            assert_eq!(complete(&buf).sni(), Some(ISTIO_SNI));
        }
    }

    #[test]
    fn large_hellos_up_to_the_cap() {
        let base = rustls_hello(ISTIO_SNI, &["istio"]);
        let big = padded(&base, 8 * 1024);
        assert_eq!(summary(&big).unwrap().0.as_deref(), Some(ISTIO_SNI));

        // ~60 KiB: four maximum-size records.
        let huge = padded(&base, 60 * 1024);
        let h = complete(&huge);
        assert_eq!(h.sni(), Some(ISTIO_SNI));
        assert_eq!(h.record_count(), 4);
        assert_eq!(h.record_bytes(), huge.len());
        assert!(huge.len() > 60 * 1024 && huge.len() <= MAX_CLIENT_HELLO_BYTES);
        for end in [0, 5, 9, 16 * 1024, 40_000, huge.len() - 1] {
            assert_eq!(parse_client_hello(&huge[..end]), HelloParse::NeedMore);
        }
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        // Handshake header declares 64 KiB of body: refused after 9 bytes.
        let buf = [22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00];
        assert!(matches!(not_tls(&buf), NotTls::TooLarge { .. }));
        assert_eq!(not_tls(&buf).reason(), "too_large");
        // The largest body that still fits: 4 records of headers + handshake header.
        let max_body = MAX_CLIENT_HELLO_BYTES - 4 * RECORD_HEADER_LEN - HANDSHAKE_HEADER_LEN;
        let fits = [
            22,
            3,
            1,
            0x40,
            0x00,
            1,
            0,
            (max_body >> 8) as u8,
            max_body as u8,
        ];
        assert_eq!(parse_client_hello(&fits), HelloParse::NeedMore);
        let over = max_body + 1;
        let buf = [
            22,
            3,
            1,
            0x40,
            0x00,
            1,
            (over >> 16) as u8,
            (over >> 8) as u8,
            over as u8,
        ];
        assert!(matches!(not_tls(&buf), NotTls::TooLarge { .. }));
        // Small records whose headers push the total over the cap.
        let msg = handshake_message(&padded(&rustls_hello(ISTIO_SNI, &[]), 64_600));
        assert!(msg.len() + 4 * RECORD_HEADER_LEN <= MAX_CLIENT_HELLO_BYTES);
        let buf = into_records(&msg, &[300]);
        assert!(matches!(not_tls(&buf), NotTls::TooLarge { .. }));
        // Refused at the first record that would end past the cap, before it arrives.
        let first_over = (MAX_CLIENT_HELLO_BYTES / 305) * 305;
        assert!(matches!(
            not_tls(&buf[..first_over + 5]),
            NotTls::TooLarge { .. }
        ));
    }

    #[test]
    fn record_count_is_bounded() {
        let msg = handshake_message(&rustls_hello(ISTIO_SNI, &["istio"]));
        let at_cap = into_records(&msg, &[msg.len().div_ceil(MAX_CLIENT_HELLO_RECORDS)]);
        assert_eq!(complete(&at_cap).sni(), Some(ISTIO_SNI));
        let over = into_records(&msg, &[1]);
        assert!(msg.len() > MAX_CLIENT_HELLO_RECORDS);
        assert_eq!(not_tls(&over), NotTls::TooManyRecords);
        assert_eq!(not_tls(&over).reason(), "too_many_records");
        // Decided as soon as the record after the last allowed one starts, not at the end.
        let cut = over.len() - (msg.len() - MAX_CLIENT_HELLO_RECORDS) * 6 + 1;
        assert_eq!(not_tls(&over[..cut]), NotTls::TooManyRecords);
    }

    #[test]
    fn non_tls_input_is_refused_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
            (b"G", "not_tls"),
            (b"PRI * HTTP/2.0\r\n", "not_tls"),
            (b"SSH-2.0-OpenSSH_9.6\r\n", "not_tls"),
            (&[21, 3, 3, 0, 2, 2, 40], "not_handshake"),
            (&[23, 3, 3, 0, 1, 0], "not_handshake"),
            (&[0x80, 0x2e, 0x01, 0x03, 0x01], "sslv2_hello"),
            (&[0x80], "sslv2_hello"),
            (&[22, 3, 0, 0, 4], "bad_record_version"),
            (&[22, 2], "bad_record_version"),
            (&[22, 3, 5], "bad_record_version"),
            (&[22, 3, 1, 0, 4, 2, 0, 0, 0], "not_client_hello"),
            (&[22, 3, 3, 0, 1, 11], "not_client_hello"),
            (&[22, 3, 1, 0, 0], "malformed"),
            (&[22, 3, 1, 0x40, 0x01], "malformed"),
        ];
        for &(buf, reason) in cases {
            assert_eq!(not_tls(buf).reason(), reason, "{buf:?}");
        }
        assert_eq!(not_tls(b"GET /"), NotTls::NotTlsRecord { first_byte: b'G' });
        assert_eq!(
            not_tls(&[22, 3, 0, 0, 4]),
            NotTls::BadRecordVersion { version: 0x0300 }
        );
        assert!(not_tls(b"GET /").to_string().contains("not speaking TLS"));
    }

    #[test]
    fn record_versions_tls10_to_tls13_are_accepted() {
        let buf = rustls_hello(ISTIO_SNI, &["istio"]);
        for minor in 1..=4u8 {
            let mut b = buf.clone();
            b[2] = minor;
            assert_eq!(
                complete(&b).sni(),
                Some(ISTIO_SNI),
                "record version 3.{minor}"
            );
        }
    }

    #[test]
    fn empty_buffer_and_partial_headers_need_more() {
        for buf in [
            &[][..],
            &[22],
            &[22, 3],
            &[22, 3, 1],
            &[22, 3, 1, 0],
            &[22, 3, 1, 0, 200, 1, 0],
        ] {
            assert_eq!(parse_client_hello(buf), HelloParse::NeedMore, "{buf:?}");
        }
    }

    #[test]
    fn malformed_contents_are_named() {
        let host = |n: &[u8]| (EXT_SERVER_NAME, sni_ext(&[(0, n)]));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                hand_hello(Some(&[host(b"a.example"), host(b"b.example")])),
                "duplicate server_name extension",
            ),
            (
                hand_hello(Some(&[(
                    EXT_SERVER_NAME,
                    sni_ext(&[(0, b"a.example"), (0, b"b")]),
                )])),
                "more than one host_name in server_name",
            ),
            (
                hand_hello(Some(&[host(b"bad host")])),
                "host_name has characters other than letters, digits, '-', '.', '_'",
            ),
            (
                hand_hello(Some(&[host("bücher.de".as_bytes())])),
                "host_name has characters other than letters, digits, '-', '.', '_'",
            ),
            (
                hand_hello(Some(&[host(b"")])),
                "host_name empty or longer than 255 bytes",
            ),
            (
                hand_hello(Some(&[host(&[b'a'; 256])])),
                "host_name empty or longer than 255 bytes",
            ),
            (
                hand_hello(Some(&[(EXT_SERVER_NAME, vec![0, 0])])),
                "empty server_name_list",
            ),
            (
                hand_hello(Some(&[(EXT_SERVER_NAME, vec![])])),
                "server_name_list",
            ),
            (
                hand_hello(Some(&[(EXT_SERVER_NAME, sni_ext(&[(7, b"x")]))])),
                "server_name without a host_name entry",
            ),
            (
                hand_hello(Some(&[
                    (EXT_ALPN, alpn_ext(&[b"h2"])),
                    (EXT_ALPN, alpn_ext(&[b"h2"])),
                ])),
                "duplicate ALPN extension",
            ),
            (
                hand_hello(Some(&[(EXT_ALPN, vec![0, 0])])),
                "empty ALPN protocol_name_list",
            ),
            (
                hand_hello(Some(&[(EXT_ALPN, vec![0, 1, 0])])),
                "empty ALPN protocol name",
            ),
            (
                hand_hello(Some(&[(EXT_ALPN, vec![0, 3, 5, b'h', b'2'])])),
                "ALPN protocol name",
            ),
        ];
        for (buf, what) in cases {
            assert_eq!(not_tls(&buf), NotTls::Malformed(what));
        }
    }

    #[test]
    fn inconsistent_lengths_are_malformed_not_panics() {
        let good = rustls_hello(ISTIO_SNI, &["istio"]);
        // Handshake length one byte shorter than the record: trailing data in the record.
        let mut b = good.clone();
        let len = u32::from_be_bytes([0, b[6], b[7], b[8]]) - 1;
        b[6..9].copy_from_slice(&len.to_be_bytes()[1..]);
        assert_eq!(
            not_tls(&b),
            NotTls::Malformed("data after the ClientHello in its record")
        );
        // Every single-byte corruption answers without panicking.
        for i in 0..good.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = good.clone();
                b[i] = v;
                let _ = parse_client_hello(&b);
            }
        }
        // A non-handshake record in the middle of a fragmented hello.
        let mut frag = refragment(&good, 2);
        let second = 5 + (usize::from(frag[3]) << 8 | usize::from(frag[4]));
        frag[second] = 23;
        assert_eq!(
            not_tls(&frag),
            NotTls::Malformed("non-handshake record inside a fragmented ClientHello")
        );
    }

    #[test]
    fn bytes_after_the_hello_are_left_for_the_caller() {
        let hello = rustls_hello(ISTIO_SNI, &["istio"]);
        let mut buf = hello.clone();
        // A change_cipher_spec record and early data may follow the hello.
        buf.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3, 0, 2, 9, 9]);
        let h = complete(&buf);
        assert_eq!(h.record_bytes(), hello.len());
    }

    #[test]
    fn error_messages_name_the_cause() {
        assert_eq!(
            NotTls::Malformed("duplicate server_name extension").to_string(),
            "malformed ClientHello: duplicate server_name extension"
        );
        assert!(
            NotTls::TooLarge { needed: 70000 }
                .to_string()
                .contains("65536")
        );
    }

    /// Regenerates the checked-in vectors; run with
    /// `cargo test --lib regenerate_client_hello_vectors -- --ignored` (needs `openssl`).
    #[test]
    #[ignore]
    fn regenerate_client_hello_vectors() {
        let write =
            |name: &str, bytes: &[u8]| std::fs::write(format!("{DATA}/{name}"), bytes).unwrap();
        write(
            "rustls_tls13_istio.bin",
            &rustls_hello(ISTIO_V2_SNI, &["istio-peer-exchange", "istio"]),
        );
        // A ~1.8 KiB hello, the size an X25519MLKEM768 key share gives.
        let pq = padded(&rustls_hello(ISTIO_SNI, &["istio"]), 1500);
        write("rustls_pq_1800.bin", &pq);
        write("rustls_pq_3_records.bin", &refragment(&pq, 3));
        write(
            "large_8k.bin",
            &padded(&rustls_hello(ISTIO_SNI, &["istio", "h2"]), 8 * 1024),
        );
        write(
            "openssl_istio.bin",
            &openssl_capture(ISTIO_SNI, "istio,istio-peer-exchange").unwrap(),
        );
    }

    /// Run `openssl s_client` against a loopback listener and return its first flight;
    /// `None` if openssl is not installed.
    fn openssl_capture(sni: &str, alpn: &str) -> Option<Vec<u8>> {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let child = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &addr.to_string(),
                "-servername",
                sni,
                "-alpn",
                alpn,
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("openssl: {e}"),
        };
        let (mut sock, _) = listener.accept().unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let out = loop {
            match parse_client_hello(&buf) {
                HelloParse::Complete(h) => break buf[..h.record_bytes()].to_vec(),
                HelloParse::NeedMore => {}
                HelloParse::NotTls(e) => panic!("openssl sent a non-ClientHello: {e}"),
            }
            let n = sock.read(&mut chunk).unwrap();
            assert!(n > 0, "openssl closed before finishing its ClientHello");
            buf.extend_from_slice(&chunk[..n]);
        };
        drop(sock);
        let _ = child.kill();
        let _ = child.wait();
        Some(out)
    }

    #[test]
    fn live_openssl_hello_with_istio_sni_and_alpn() {
        let Some(buf) = openssl_capture(ISTIO_SNI, "istio,istio-peer-exchange") else {
            eprintln!(
                "openssl not installed; live capture skipped (checked-in vector still tested)"
            );
            return;
        };
        let h = complete(&buf);
        assert_eq!(h.sni(), Some(ISTIO_SNI));
        assert_eq!(h.alpn_display(), "istio,istio-peer-exchange");
    }

    fn vectors() -> Vec<Vec<u8>> {
        let base = rustls_hello(ISTIO_V2_SNI, &["istio-peer-exchange", "istio"]);
        vec![
            base.clone(),
            padded(&base, 1500),
            hand_hello(Some(&[(EXT_ALPN, alpn_ext(&[b"istio"]))])),
            hand_hello(None),
            read_vector("openssl_istio.bin"),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let HelloParse::Complete(h) = parse_client_hello(&buf) {
                prop_assert!(h.record_bytes() <= buf.len());
                prop_assert!(h.body().len() < buf.len());
                let _ = (h.sni(), h.alpn().count(), h.alpn_display());
            }
        }

        #[test]
        fn arbitrary_records_never_panic(
            msg in proptest::collection::vec(any::<u8>(), 0..1024),
            sizes in proptest::collection::vec(1usize..300, 1..6),
        ) {
            // Valid record framing around random handshake bytes reaches the body parser.
            let mut m = vec![1, 0, (msg.len() >> 8) as u8, msg.len() as u8];
            m.extend_from_slice(&msg);
            let buf = into_records(&m, &sizes);
            if let HelloParse::Complete(h) = parse_client_hello(&buf) {
                prop_assert_eq!(h.record_bytes(), buf.len());
                prop_assert_eq!(h.body(), &msg[..]);
            }
        }

        #[test]
        fn prefixes_of_a_valid_hello_need_more(which in 0usize..5, cut in any::<prop::sample::Index>()) {
            let buf = &vectors()[which];
            let end = cut.index(buf.len());
            prop_assert_eq!(parse_client_hello(&buf[..end]), HelloParse::NeedMore);
        }

        #[test]
        fn random_fragmentation_parses_the_same(
            which in 0usize..5,
            sizes in proptest::collection::vec(8usize..600, 1..12),
        ) {
            let original = &vectors()[which];
            let expected = summary(original);
            prop_assert!(expected.is_ok());
            let buf = into_records(&handshake_message(original), &sizes);
            prop_assert_eq!(summary(&buf), expected);
            prop_assert_eq!(complete(&buf).record_bytes(), buf.len());
        }
    }
}
