//! Extra root certificates for the HTTPS and WSS clients (feature `tls`):
//! a private CA, or a server's self-signed certificate, trusted next to the
//! usual roots (the webpki roots, for reqwest and tungstenite).

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

    /// Adds `roots`, if any, to a reqwest client.
    #[cfg(feature = "http")]
    pub(crate) fn trusted(
        builder: reqwest::ClientBuilder,
        roots: Option<&RootCertificates>,
    ) -> reqwest::ClientBuilder {
        match roots {
            Some(roots) => roots.reqwest(builder),
            None => builder,
        }
    }

    /// Adds them to a reqwest client.
    #[cfg(feature = "http")]
    fn reqwest(&self, mut builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for cert in self.0.iter() {
            if let Ok(cert) = reqwest::Certificate::from_der(cert) {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
    }

    /// A rustls client config (webpki roots plus these) for tungstenite.
    #[cfg(feature = "websocket")]
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
}
