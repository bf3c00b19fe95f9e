//! The environment's own PKI: a CA, the apiserver's serving certificate, client certificates,
//! and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::error::{Error, ErrorKind, Result};

/// A certificate and its private key, both PEM.
pub(crate) struct Pem {
    pub cert: String,
    pub key: String,
}

pub(crate) struct Pki {
    pub ca: Pem,
    pub serving: Pem,
    pub admin: Pem,
    pub controller_manager: Pem,
    /// Service-account token signing key (private, PKCS#8) and its public key.
    pub sa_key: String,
    pub sa_pub: String,
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> Error + '_ {
    move |e| Error::with_source(ErrorKind::Other, format!("cannot make {what}"), e)
}

impl Pki {
    pub(crate) fn generate() -> Result<Pki> {
        let ca_key = KeyPair::generate().map_err(cert_err("the CA key"))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("the CA certificate"))?;
        ca_params.distinguished_name.push(DnType::CommonName, "iam-key-operator testenv CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(cert_err("the CA certificate"))?;
        let ca = Pem { cert: ca_cert.pem(), key: ca_key.serialize_pem() };
        let issuer = Issuer::new(ca_params, ca_key);

        let serving = {
            let mut params = CertificateParams::new(vec![
                "localhost".to_string(),
                "kubernetes".to_string(),
                "kubernetes.default".to_string(),
                "kubernetes.default.svc".to_string(),
                "kubernetes.default.svc.cluster.local".to_string(),
            ])
            .map_err(cert_err("the serving certificate"))?;
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            // The first address of service-cluster-ip-range: the `kubernetes` Service.
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
            params.distinguished_name.push(DnType::CommonName, "kube-apiserver");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            leaf(params, &issuer, "the serving certificate")?
        };

        let admin = client_cert("admin", "system:masters", &issuer)?;
        // All of its controllers act with these credentials; system:masters keeps the
        // namespace controller free to delete anything a test puts in a namespace.
        let controller_manager = client_cert("system:kube-controller-manager", "system:masters", &issuer)?;

        let sa = KeyPair::generate().map_err(cert_err("the service-account key"))?;
        Ok(Pki { ca, serving, admin, controller_manager, sa_key: sa.serialize_pem(), sa_pub: sa.public_key_pem() })
    }
}

fn client_cert(cn: &str, org: &str, issuer: &Issuer<'_, KeyPair>) -> Result<Pem> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("a client certificate"))?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, org);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf(params, issuer, "a client certificate")
}

fn leaf(mut params: CertificateParams, issuer: &Issuer<'_, KeyPair>, what: &str) -> Result<Pem> {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(cert_err(what))?;
    let cert = params.signed_by(&key, issuer).map_err(cert_err(what))?;
    Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
}
