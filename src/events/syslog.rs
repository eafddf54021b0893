//! The syslog sink: RFC 5424 messages (facility local0, app-name `lrvault`, msgid = the
//! event's kind, no structured data, the event's JSON as MSG) over UDP (one datagram each),
//! TCP (RFC 6587 octet counting: `LEN SP MSG`, one connection kept open) or a unix datagram
//! socket such as `/dev/log`.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket, UnixDatagram};

use crate::config::SyslogTarget;

/// RFC 5424 facility local0.
const LOCAL0: u8 = 16;
/// Connecting to a TCP receiver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Writing one message to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The RFC 5424 severity of an event kind: a defect is an error, a result lost or a tenant
/// cut off a warning, the rest notices.
fn severity(kind: &str) -> u8 {
    match kind {
        "VERIFY_FAILED" => 3,
        "FAILED" | "UNAVAILABLE" | "BREAKER_OPEN" => 4,
        _ => 5,
    }
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOSTNAME lrvault PROCID MSGID - MSG`.
pub fn format(kind: &str, at: &str, hostname: &str, pid: u32, msg: &[u8]) -> Vec<u8> {
    let host: String = hostname
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    let host = if host.is_empty() { "-".into() } else { host };
    let mut out = format!(
        "<{}>1 {at} {host} lrvault {pid} {kind} - ",
        LOCAL0 * 8 + severity(kind)
    )
    .into_bytes();
    out.extend_from_slice(msg);
    out
}

/// The configured receiver; a TCP connection is kept between messages and opened again
/// after an error.
pub struct SyslogSink {
    target: SyslogTarget,
    hostname: String,
    tcp: Option<TcpStream>,
}

impl SyslogSink {
    pub fn new(target: SyslogTarget) -> SyslogSink {
        SyslogSink {
            target,
            hostname: crate::custody::hostname().unwrap_or_default(),
            tcp: None,
        }
    }

    /// Sends one event; an error is one line naming the transport (never the message).
    pub async fn send(&mut self, kind: &str, at: &str, body: &[u8]) -> Result<(), String> {
        let message = format(kind, at, &self.hostname, std::process::id(), body);
        let sent = match self.target.clone() {
            SyslogTarget::Udp(addr) => udp(&addr, &message).await,
            SyslogTarget::Unix(path) => {
                let socket = UnixDatagram::unbound().map_err(|e| e.to_string())?;
                socket
                    .send_to(&message, &path)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("syslog socket {}: {e}", path.display()))
            }
            SyslogTarget::Tcp(addr) => self.tcp(&addr, &message).await,
        };
        sent.map_err(|e| format!("syslog: {e}"))
    }

    async fn tcp(&mut self, addr: &str, message: &[u8]) -> Result<(), String> {
        if self.tcp.is_none() {
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr));
            let stream = connect
                .await
                .map_err(|_| format!("tcp {addr}: no connection within {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| format!("tcp {addr}: {e}"))?;
            self.tcp = Some(stream);
        }
        let stream = self.tcp.as_mut().expect("connected above");
        let mut frame = format!("{} ", message.len()).into_bytes();
        frame.extend_from_slice(message);
        let written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&frame)).await;
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.tcp = None;
                Err(format!("tcp {addr}: {e}"))
            }
            Err(_) => {
                self.tcp = None;
                Err(format!("tcp {addr}: write took over {WRITE_TIMEOUT:?}"))
            }
        }
    }
}

async fn udp(addr: &str, message: &[u8]) -> Result<(), String> {
    let target = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("udp {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("udp {addr}: the name has no address"))?;
    let local = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("udp {addr}: {e}"))?;
    socket
        .send_to(message, target)
        .await
        .map(|_| ())
        .map_err(|e| format!("udp {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_rfc_5424_local0() {
        let m = format(
            "ARCHIVED",
            "2026-12-07T15:00:00.123Z",
            "vault 1",
            42,
            br#"{"kind":"ARCHIVED"}"#,
        );
        assert_eq!(
            String::from_utf8(m).unwrap(),
            r#"<133>1 2026-12-07T15:00:00.123Z vault1 lrvault 42 ARCHIVED - {"kind":"ARCHIVED"}"#
        );
        let m = format("VERIFY_FAILED", "2026-12-07T15:00:00.123Z", "", 1, b"{}");
        assert!(m.starts_with(b"<131>1 2026-12-07T15:00:00.123Z - lrvault 1 VERIFY_FAILED - "));
    }
}
