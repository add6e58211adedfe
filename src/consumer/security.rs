//! Refusals at start: a broker that rejects the worker's SASL credentials, or TLS with
//! it that fails (a certificate not signed by a trusted CA, or issued to another host
//! name). This module owns telling those from an outage, and naming their cause.
//!
//! librdkafka retries a refused connection forever, exactly as it retries a broker
//! that is down, and reports each attempt as an error event — `__AUTHENTICATION` or
//! `__SSL`, with a reason — which the consumer's context hands to [`ConnectionErrors`].
//! The start-up check ends at the first such refusal instead of waiting out its
//! timeout: a restart with the same configuration would be refused the same way.
//! (Later, while running, they are only logged and retried: credentials rotated on
//! the broker side come back without a restart.)
//!
//! librdkafka words every certificate verification failure alike ("certificate verify
//! failed: broker certificate could not be verified, verify that ssl.ca.location is
//! correctly configured"), a certificate issued to another host name included, so
//! [`tls_cause`] asks OpenSSL itself which check failed, with one handshake to the
//! broker that refused, verified as librdkafka verifies it.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use openssl::ssl::{HandshakeError, Ssl, SslContext, SslMethod, SslVerifyMode};
use openssl::x509::{X509VerifyResult, X509};
use rdkafka::types::RDKafkaErrorCode;

use super::ConsumerError;
use crate::config::Config;

/// The connection errors librdkafka reported, as the start-up check needs them.
#[derive(Default)]
pub(super) struct ConnectionErrors(Mutex<Recorded>);

#[derive(Default)]
struct Recorded {
    /// The first refusal: the cause, not the retries that repeat it.
    refusal: Option<Refusal>,
    /// The latest error of any kind, for a start that times out.
    last: Option<String>,
}

/// A broker's refusal, with librdkafka's reason.
#[derive(Debug, Clone)]
pub(super) enum Refusal {
    Authentication(String),
    Tls(String),
}

impl ConnectionErrors {
    /// Records an error event of the client (`reason` already scrubbed of secrets).
    pub(super) fn record(&self, code: Option<RDKafkaErrorCode>, reason: &str) {
        let Ok(mut recorded) = self.0.lock() else {
            return;
        };
        let refusal = match code {
            Some(RDKafkaErrorCode::Authentication) => Some(Refusal::Authentication(reason.into())),
            Some(RDKafkaErrorCode::SSL) => Some(Refusal::Tls(reason.into())),
            _ => None,
        };
        if recorded.refusal.is_none() {
            recorded.refusal = refusal;
        }
        // "1/1 brokers are down" says less than the error that took the broker down.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) {
            recorded.last = Some(reason.into());
        }
    }

    pub(super) fn refusal(&self) -> Option<Refusal> {
        self.0.lock().ok()?.refusal.clone()
    }

    pub(super) fn last(&self) -> Option<String> {
        self.0.lock().ok()?.last.clone()
    }
}

/// The start-up error for a refusal.
pub(super) fn refused(refusal: Refusal, config: &Config) -> ConsumerError {
    match refusal {
        Refusal::Authentication(reason) => ConsumerError::Authentication { reason },
        Refusal::Tls(reason) => ConsumerError::Tls {
            cause: tls_cause(&reason, config),
            reason,
        },
    }
}

/// Why TLS with a broker failed, as far as the worker can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCause {
    /// The certificate verifies, but is issued to other names than the one the worker
    /// connected to.
    HostnameMismatch { host: String },
    /// The certificate does not verify: OpenSSL's reason, e.g. "unable to get local
    /// issuer certificate" for an issuer not among the trusted CAs.
    Untrusted { detail: String },
    /// Not diagnosed: the broker could not be reached again, or the handshake failed
    /// after the certificate was accepted (say, a client certificate is required).
    Handshake,
}

impl fmt::Display for TlsCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HostnameMismatch { host } => write!(
                f,
                "hostname mismatch: the broker's certificate is not issued to {host:?} \
                 (connect through a name or address the certificate lists: RECON_KAFKA_BROKERS \
                 and the brokers' advertised listeners)"
            ),
            Self::Untrusted { detail } => write!(
                f,
                "certificate verify failed: {detail} (RECON_KAFKA_PROP_SSL_CA_LOCATION must \
                 name the CA that signed the brokers' certificates)"
            ),
            Self::Handshake => write!(f, "TLS handshake failed"),
        }
    }
}

/// How long the diagnostic handshake may take, per step.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The cause of the TLS failure librdkafka reported as `reason`, from one handshake of
/// the worker's own to the same broker, with the same trusted CAs and the same host
/// name check as librdkafka's (`ssl.ca.location`/`ssl.ca.pem`, `SSL_set1_host` on the
/// name it connected to unless `ssl.endpoint.identification.algorithm=none`).
fn tls_cause(reason: &str, config: &Config) -> TlsCause {
    if !reason.contains("certificate verify failed") {
        return TlsCause::Handshake;
    }
    let Some((host, port)) = broker_address(reason) else {
        return TlsCause::Handshake;
    };
    let properties = &config.kafka_properties;
    let check_host = properties
        .get("ssl.endpoint.identification.algorithm")
        .is_none_or(|algorithm| algorithm != "none");
    let result = match verify(&host, port, check_host, properties) {
        Ok(result) => result,
        Err(error) => {
            tracing::debug!(%error, "diagnostic TLS handshake failed");
            return TlsCause::Handshake;
        }
    };
    match result.as_raw() {
        openssl_sys::X509_V_ERR_HOSTNAME_MISMATCH | openssl_sys::X509_V_ERR_IP_ADDRESS_MISMATCH => {
            TlsCause::HostnameMismatch { host }
        }
        _ if result == X509VerifyResult::OK => TlsCause::Handshake,
        _ => TlsCause::Untrusted {
            detail: result.error_string().to_owned(),
        },
    }
}

/// The broker a librdkafka reason is about: `ssl://localhost:9093/bootstrap: ...` or
/// `sasl_ssl://[::1]:9093/1: ...` → (host, port).
fn broker_address(reason: &str) -> Option<(String, u16)> {
    let (_, rest) = reason.split_once("://")?;
    let (address, _) = rest.split_once('/')?;
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

/// The result of OpenSSL's verification of `host:port`'s certificate.
fn verify(
    host: &str,
    port: u16,
    check_host: bool,
    properties: &BTreeMap<String, String>,
) -> Result<X509VerifyResult, Box<dyn std::error::Error>> {
    let property = |name: &str| properties.get(name).map(String::as_str);
    let mut context = SslContext::builder(SslMethod::tls_client())?;
    context.set_verify(SslVerifyMode::PEER);
    match (property("ssl.ca.pem"), property("ssl.ca.location")) {
        (Some(pem), _) => {
            for certificate in X509::stack_from_pem(pem.as_bytes())? {
                context.cert_store_mut().add_cert(certificate)?;
            }
        }
        (None, Some(location)) if location != "probe" => {
            let location = Path::new(location);
            if location.is_dir() {
                context.load_verify_locations(None, Some(location))?;
            } else {
                context.set_ca_file(location)?;
            }
        }
        _ => context.set_default_verify_paths()?,
    }
    let context = context.build();
    let mut ssl = Ssl::new(&context)?;
    match host.parse::<IpAddr>() {
        Ok(ip) if check_host => ssl.param_mut().set_ip(ip)?,
        Ok(_) => {}
        Err(_) => {
            ssl.set_hostname(host)?;
            if check_host {
                ssl.param_mut().set_host(host)?;
            }
        }
    }
    let stream = connect(host, port)?;
    match ssl.connect(stream) {
        Ok(_) => Ok(X509VerifyResult::OK),
        Err(HandshakeError::Failure(stream) | HandshakeError::WouldBlock(stream)) => {
            Ok(stream.ssl().verify_result())
        }
        Err(HandshakeError::SetupFailure(error)) => Err(error.into()),
    }
}

fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for address in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&address, PROBE_TIMEOUT) {
            Ok(stream) => {
                stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
                stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
                return Ok(stream);
            }
            Err(error) => last = error,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_is_read_from_librdkafkas_reason() {
        assert_eq!(
            broker_address("ssl://localhost:9095/bootstrap: SSL handshake failed: x"),
            Some(("localhost".into(), 9095))
        );
        assert_eq!(
            broker_address("sasl_ssl://[::1]:9094/1: SSL handshake failed"),
            Some(("::1".into(), 9094))
        );
        assert_eq!(broker_address("1/1 brokers are down"), None);
    }

    #[test]
    fn the_first_refusal_is_kept_and_the_last_error_follows() {
        let errors = ConnectionErrors::default();
        errors.record(Some(RDKafkaErrorCode::BrokerTransportFailure), "refused");
        assert!(errors.refusal().is_none());
        errors.record(Some(RDKafkaErrorCode::Authentication), "bad credentials");
        errors.record(Some(RDKafkaErrorCode::SSL), "later");
        errors.record(
            Some(RDKafkaErrorCode::AllBrokersDown),
            "1/1 brokers are down",
        );
        assert!(matches!(
            errors.refusal(),
            Some(Refusal::Authentication(reason)) if reason == "bad credentials"
        ));
        assert_eq!(errors.last().as_deref(), Some("later"));
    }
}
