//! TLS to the broker with its CA pinned by the join string.
//!
//! The join string carries the SHA-256 of the broker's CA certificate. A
//! server is trusted only if the chain it sends contains a certificate with
//! that hash and that certificate signed the server's certificate for the
//! name asked for ([`crate::join::BROKER_SERVER_NAME`]). There is no trust
//! store: the pin is the whole trust. The admin CLI and the cluster agent
//! share this.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// SHA-256 of a DER certificate: what a pin is made of.
#[must_use]
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The server's chain lacks the pinned CA. Carried inside the rustls error
/// so callers can tell it (final: a new join string is needed) from network
/// trouble (worth retrying) with [`is_pin_mismatch`].
#[derive(Debug, thiserror::Error)]
#[error(
    "the broker's CA does not match the pin in the join string: the join string is for another broker, or someone is in between"
)]
pub struct PinMismatch;

/// Whether `e` or any error in its source chain is a [`PinMismatch`].
#[must_use]
pub fn is_pin_mismatch(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<PinMismatch>() {
            return true;
        }
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) =
            err.downcast_ref::<rustls::Error>()
            && o.0.is::<PinMismatch>()
        {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && is_pin_mismatch(inner)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Trusts a server whose chain carries the pinned CA, valid under it.
#[derive(Debug)]
pub struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCa {
    #[must_use]
    pub fn new(pin: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self { pin, provider }
    }
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                    rustls::OtherError(Arc::new(PinMismatch)),
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&self.provider))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client config (HTTP/2) trusting only the pinned CA, presenting
/// `identity` (certificate chain and key) when given.
pub fn client_config(
    pin: [u8; 32],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa::new(pin, provider)));
    let mut config = match identity {
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_mismatch_is_found_through_io_and_rustls_wrappers() {
        let rustls_err = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(PinMismatch)),
        ));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_err);
        assert!(is_pin_mismatch(&io));
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!is_pin_mismatch(&other));
        let expired = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(!is_pin_mismatch(&expired));
    }

    #[test]
    fn configs_speak_http2() {
        let c = client_config([7; 32], None).unwrap();
        assert_eq!(c.alpn_protocols, vec![b"h2".to_vec()]);
    }
}
