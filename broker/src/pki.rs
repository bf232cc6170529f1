//! The broker's CA and the certificates it makes, persisted in the data dir.
//!
//! Files: `ca.pem` (CA certificate), `ca.key` (its key, mode 0600) and
//! `admin.pem` (admin certificate, its key and the CA certificate, mode 0600).
//! The server certificate is made afresh at each start, so its SANs follow
//! `--advertise`. Identity is decided by the SHA-256 of the exact client
//! certificate, so no cluster name can ever stand for the admin.

use crate::error::{Error, Result};
use crate::state::sha256;
use l2mesh_proto::join::{BROKER_SERVER_NAME, JoinString};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use x509_parser::time::ASN1Time;

/// Common name prefix of cluster certificates.
pub const CLUSTER_CN_PREFIX: &str = "l2mesh-cluster:";
/// Common name of the admin certificate.
pub const ADMIN_CN: &str = "l2mesh-admin";

/// Lifetime of a CA the broker creates.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of the admin certificate; the broker makes a new `admin.pem`
/// at start when the old one has less than [`ADMIN_RENEW_BEFORE`] left.
pub const ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
pub const ADMIN_RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this long before they are made (clock skew), or a
/// tenth of their lifetime if that is shorter, so that "two thirds of the
/// validity" stays close to two thirds of the lifetime.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Sets a certificate's validity to `[now - BACKDATE, now + lifetime]`;
/// returns `not_after` in Unix seconds.
fn set_validity(p: &mut CertificateParams, lifetime: Duration) -> Result<i64> {
    let now = crate::server::now_unix();
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let at = |t: i64| {
        ASN1Time::from_timestamp(t)
            .map(|a| a.to_datetime())
            .map_err(|e| Error::Pki(format!("certificate time {t}: {e}")))
    };
    let not_after = now.saturating_add(secs(lifetime));
    p.not_before = at(now - secs(BACKDATE.min(lifetime / 10)))?;
    p.not_after = at(not_after)?;
    Ok(not_after)
}

/// `not_after` of a PEM certificate, in Unix seconds.
pub fn not_after_unix(cert_der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert_der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}

/// Refuse CSR keys that the signature check cannot handle, by name
/// (otherwise they fail as an "invalid signature").
fn check_csr_key(csr_pem: &str) -> Result<()> {
    use rustls::pki_types::CertificateSigningRequestDer;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer as _;
    use x509_parser::public_key::PublicKey;
    let Ok(der) = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()) else {
        return Ok(()); // rcgen names the PEM problem
    };
    let Ok((_, req)) = X509CertificationRequest::from_der(der.as_ref()) else {
        return Ok(());
    };
    let spki = &req.certification_request_info.subject_pki;
    let algorithm = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let refused = match (algorithm.as_str(), spki.parsed()) {
        ("1.3.101.112", _) => None,
        (_, Ok(PublicKey::RSA(rsa))) => {
            let bits = rsa.key_size();
            (!(2048..=8192).contains(&bits)).then(|| format!("RSA-{bits}"))
        }
        (_, Ok(PublicKey::EC(_))) => match curve.as_deref() {
            Some("1.2.840.10045.3.1.7" | "1.3.132.0.34") => None,
            Some("1.3.132.0.35") => Some("ECDSA P-521".to_owned()),
            Some(other) => Some(format!("ECDSA on curve {other}")),
            None => Some("ECDSA without a named curve".to_owned()),
        },
        (other, _) => Some(format!("key algorithm {other}")),
    };
    match refused {
        None => Ok(()),
        Some(kind) => Err(Error::InvalidArgument(format!(
            "the CSR's key is {kind}, which the broker does not accept: make the key ECDSA P-256 or P-384, Ed25519, or RSA of 2048-8192 bits"
        ))),
    }
}

/// The loaded CA, server identity and admin fingerprint.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_der: Vec<u8>,
    /// `[server cert, CA cert]`, PEM.
    pub server_chain_pem: String,
    /// Server key, PKCS#8 PEM.
    pub server_key_pem: String,
    /// SHA-256 of the admin certificate (DER).
    pub admin_sha256: [u8; 32],
    /// Where the admin credential lives.
    pub admin_path: PathBuf,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_pin", &self.ca_pin())
            .field("admin_path", &self.admin_path)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, "l2mesh");
    d.push(DnType::CommonName, cn);
    d
}

fn leaf_params(cn: &str, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(cn);
    p.serial_number = Some(random_serial());
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    p.use_authority_key_identifier_extension = true;
    p
}

/// Write a file readable only by its owner, atomically (temp + rename).
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("cannot create {}", tmp.display()), e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("cannot write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("cannot rename to {}", path.display()), e))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))
}

/// The host part of `host:port` (brackets of IPv6 removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Pki {
    /// Load the CA and admin credential from `dir`, creating what is missing,
    /// and make a server certificate valid for `advertise`.
    pub fn load_or_create(dir: &Path, advertise: &[String]) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create data dir {}", dir.display()), e))?;
        let ca_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if !ca_path.exists() || !key_path.exists() {
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::default();
            p.distinguished_name = dn("l2mesh broker CA");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.serial_number = Some(random_serial());
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            set_validity(&mut p, CA_LIFETIME)?;
            let cert = p.self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem())?;
            write_private(&ca_path, &cert.pem())?;
            tracing::info!(path = %ca_path.display(), "created the broker CA");
        }
        let ca_pem = read(&ca_path)?;
        let ca_key = KeyPair::from_pem(&read(&key_path)?)?;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("{}: {e}", ca_path.display())))?
            .to_vec();
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

        let admin_path = dir.join("admin.pem");
        let renew_by = crate::server::now_unix()
            .saturating_add(i64::try_from(ADMIN_RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX));
        let admin_expiring = admin_path.exists()
            && AdminCredential::load(&admin_path)
                .ok()
                .and_then(|a| not_after_unix(&a.cert))
                .is_none_or(|t| t < renew_by);
        if !admin_path.exists() || admin_expiring {
            let key = KeyPair::generate()?;
            let mut p = leaf_params(ADMIN_CN, ExtendedKeyUsagePurpose::ClientAuth);
            p.subject_alt_names = vec![SanType::URI("l2mesh://admin".try_into()?)];
            set_validity(&mut p, ADMIN_LIFETIME)?;
            let cert = p.signed_by(&key, &issuer)?;
            write_private(
                &admin_path,
                &format!("{}{}{}", cert.pem(), key.serialize_pem(), ca_pem),
            )?;
            tracing::info!(path = %admin_path.display(), renewed = admin_expiring, "created the admin credential");
        }
        let admin = AdminCredential::load(&admin_path)?;

        let key = KeyPair::generate()?;
        let mut p = leaf_params(BROKER_SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth);
        let mut sans = vec![SanType::DnsName(BROKER_SERVER_NAME.try_into()?)];
        for a in advertise {
            let host = host_of(a);
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(host.try_into().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "advertise address {a:?} has no valid host name"
                    ))
                })?),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        p.subject_alt_names = sans;
        set_validity(&mut p, ADMIN_LIFETIME)?;
        let server = p.signed_by(&key, &issuer)?;

        Ok(Self {
            server_chain_pem: format!("{}{}", server.pem(), ca_pem),
            server_key_pem: key.serialize_pem(),
            admin_sha256: sha256(&admin.cert),
            admin_path,
            issuer,
            ca_pem,
            ca_der,
        })
    }

    /// The CA certificate, PEM.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    #[must_use]
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The join-string pin of the CA.
    #[must_use]
    pub fn ca_pin(&self) -> String {
        JoinString::format_pin(&sha256(&self.ca_der))
    }

    /// Sign a cluster's CSR, valid for `lifetime`. Only the CSR's public key
    /// is used: the broker decides the subject, names and usages. Returns
    /// PEM, SHA-256 of DER and `not_after` (Unix seconds).
    pub fn sign_cluster_csr(
        &self,
        csr_pem: &str,
        cluster: &str,
        lifetime: Duration,
    ) -> Result<(String, [u8; 32], i64)> {
        check_csr_key(csr_pem)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            Error::InvalidArgument(format!(
                "csr_pem is not a valid, self-signed PKCS#10 request in PEM ({e})"
            ))
        })?;
        let mut params = leaf_params(
            &format!("{CLUSTER_CN_PREFIX}{cluster}"),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        params.subject_alt_names = vec![SanType::URI(
            format!("l2mesh://cluster/{cluster}").try_into()?,
        )];
        let not_after = set_validity(&mut params, lifetime)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok((signed.pem(), sha256(signed.der()), not_after))
    }
}

/// The admin credential file: certificate, key and CA certificate.
#[derive(Debug)]
pub struct AdminCredential {
    /// Admin certificate, DER.
    pub cert: Vec<u8>,
    /// Admin key, DER.
    pub key: PrivateKeyDer<'static>,
    /// CA certificate, DER.
    pub ca: Vec<u8>,
}

impl AdminCredential {
    /// Read `path` (as written by the broker on first start).
    pub fn load(path: &Path) -> Result<Self> {
        let text = read(path)?;
        let bad = |what: &str| {
            Error::InvalidArgument(format!(
                "{} is not an l2mesh admin credential ({what}): use the admin.pem from the broker's data dir",
                path.display()
            ))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad("unreadable certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|_| bad("no private key"))?;
        match certs.as_slice() {
            [cert, ca] => Ok(Self {
                cert: cert.to_vec(),
                key,
                ca: ca.to_vec(),
            }),
            _ => Err(bad("expected two certificates")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_reloads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path(), &["127.0.0.1:7443".into()]).unwrap();
        let b = Pki::load_or_create(dir.path(), &["broker.example:7443".into()]).unwrap();
        assert_eq!(a.ca_pin(), b.ca_pin());
        assert_eq!(a.admin_sha256, b.admin_sha256);
        assert_ne!(a.server_key_pem, b.server_key_pem);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }

    #[test]
    fn signs_csrs_with_its_own_subject() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = dn(ADMIN_CN);
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let day = Duration::from_secs(86_400);
        let (pem, hash, not_after) = pki.sign_cluster_csr(&csr, "edge", day).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(sha256(&der), hash);
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = parsed.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "l2mesh-cluster:edge");
        // A finite lifetime, not rcgen's year 4096.
        let now = crate::server::now_unix();
        assert_eq!(parsed.validity().not_after.timestamp(), not_after);
        assert!(
            (not_after - now - 86_400).abs() < 10,
            "{not_after} vs {now}"
        );
        assert!(pki.sign_cluster_csr("garbage", "edge", day).is_err());
        let ca = CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap();
        let ca_end = not_after_unix(&ca).unwrap();
        assert!(ca_end < now + 11 * 365 * 86_400 && ca_end > now + 9 * 365 * 86_400);
        let admin = AdminCredential::load(&pki.admin_path).unwrap();
        assert!(not_after_unix(&admin.cert).unwrap() < now + 366 * 86_400);
    }

    #[test]
    fn unsupported_csr_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path(), &[]).unwrap();
        let day = Duration::from_secs(86_400);
        // A P-521 key from rcgen itself cannot be made with ring, so take a
        // fixed one (made with `openssl req -newkey ec:P-521`).
        let p521 = include_str!("../tests/data/p521.csr");
        let err = pki.sign_cluster_csr(p521, "edge", day).unwrap_err();
        assert!(err.to_string().contains("ECDSA P-521"), "{err}");
        let rsa1024 = include_str!("../tests/data/rsa1024.csr");
        let err = pki.sign_cluster_csr(rsa1024, "edge", day).unwrap_err();
        assert!(err.to_string().contains("RSA-1024"), "{err}");
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            pki.sign_cluster_csr(&csr, "edge", day).unwrap();
        }
    }

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(host_of("10.0.0.1:7443"), "10.0.0.1");
        assert_eq!(host_of("[::1]:7443"), "::1");
        assert_eq!(host_of("broker"), "broker");
    }
}
