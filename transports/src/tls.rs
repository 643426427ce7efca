//! Extra root certificates for the HTTPS and WSS clients (feature `tls`):
//! a private CA, or a server's self-signed certificate, trusted next to the
//! usual roots (the webpki roots for reqwest and tungstenite, the system's
//! for the SSE stream).

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// PEM text that holds no usable certificate.
#[derive(Debug, thiserror::Error)]
#[error("invalid root certificate: {0}")]
pub struct CertificateError(String);

/// Root certificates to trust in addition to the usual ones, parsed from PEM
/// (one or more `BEGIN CERTIFICATE` blocks).
///
/// ```no_run
/// # fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use crsync_transports::sse::SseDialer;
/// use crsync_transports::tls::RootCertificates;
/// let roots = RootCertificates::from_pem(&std::fs::read("ca.pem")?)?;
/// let dialer = SseDialer::new("https://sync.example.com/db/notes").with_root_certificates(roots);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct RootCertificates(Arc<Vec<CertificateDer<'static>>>);

impl RootCertificates {
    /// The certificates in `pem`; at least one.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CertificateError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CertificateError(e.to_string()))?;
        if certs.is_empty() {
            return Err(CertificateError("no BEGIN CERTIFICATE block".into()));
        }
        Ok(RootCertificates(Arc::new(certs)))
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds them to a reqwest client.
    pub(crate) fn reqwest(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for cert in self.0.iter() {
            if let Ok(cert) = reqwest::Certificate::from_der(cert) {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
    }

    /// A rustls client config (webpki roots plus these) for tungstenite.
    pub(crate) fn rustls(&self) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let (_added, _ignored) = roots.add_parsable_certificates(self.0.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    /// The HTTPS connector of the SSE stream (eventsource-client's hyper
    /// 0.14 stack, rustls 0.21): the system's roots plus these.
    pub(crate) fn sse_connector(
        &self,
    ) -> hyper_rustls::HttpsConnector<hyper_014::client::HttpConnector> {
        let mut roots = rustls_021::RootCertStore::empty();
        if let Ok(native) = rustls_native_certs::load_native_certs() {
            for cert in native {
                let _ = roots.add(&rustls_021::Certificate(cert.0));
            }
        }
        for cert in self.0.iter() {
            let _ = roots.add(&rustls_021::Certificate(cert.to_vec()));
        }
        let config = rustls_021::ClientConfig::builder()
            .with_safe_defaults()
            .with_root_certificates(roots)
            .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build()
    }
}
