//! RFC 3161 trusted time: the TimeStampReq for a checkpoint, the HTTP exchange with the
//! timestamp authority, and the checks a token must pass (status, message imprint, the CMS
//! signature over the TSTInfo, and the signer's chain to `tsa_ca_file` at the token's time).
//!
//! The ASN.1 types come from RustCrypto's `x509-tsp`, `cms` and `x509-cert`; signatures and
//! the certificate path are checked by `rustls-webpki` on *ring* (RSA PKCS#1 and PSS, ECDSA P-256
//! and P-384 with SHA-256/384, Ed25519).
//! These are the checks `openssl ts -verify -CAfile` makes, except the ESS signing-certificate
//! attribute (the signer is identified by issuer and serial number, or key identifier, and its
//! key must verify the signature).

use std::path::Path;
use std::time::Duration;

use cms::cert::CertificateChoices;
use cms::cert::x509::Certificate;
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use der::asn1::{Int, OctetString, Uint};
use der::oid::ObjectIdentifier;
use der::{Any, Decode, Encode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use sha2::Digest;
use x509_tsp::{MessageImprint, TimeStampReq, TimeStampResp, TspVersion, TstInfo};

const ID_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const ID_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const ID_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TST_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
const ID_SUBJECT_KEY_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
/// id-kp-timeStamping (1.3.6.1.5.5.7.3.8), as the DER value bytes webpki wants.
const TIME_STAMPING_EKU: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08];
/// A timestamp response is a few KiB; refuse to buffer more than this.
const MAX_RESPONSE_BYTES: usize = 1 << 20;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a token could not be had or does not verify; each says what an examiner would see.
#[derive(Debug, thiserror::Error)]
pub enum TsaError {
    #[error("timestamp authority {url} did not answer: {message}")]
    Unreachable { url: String, message: String },
    #[error("timestamp authority {url} answered HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("the timestamp authority refused the request (status {status})")]
    Refused { status: String },
    #[error("malformed timestamp response: {0}")]
    Malformed(String),
    #[error(
        "message imprint does not match the checkpoint (token is for {found}, the file hashes to {expected})"
    )]
    Imprint { expected: String, found: String },
    #[error("the token's nonce is not the one requested")]
    Nonce,
    #[error("signature does not verify: {0}")]
    Signature(String),
    #[error("signer's certificate does not chain to tsa_ca_file at the token's time: {0}")]
    Chain(String),
    #[error("cannot use tsa_ca_file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error(
        "no anchor.tsa_ca_file to check it against: a token counts only when its signer chains to the TSA's own CA, never on the certificates inside it"
    )]
    Untrusted,
    #[error("the token's policy is {found}, anchor.tsa_policy is {expected}")]
    Policy { expected: String, found: String },
}

/// The certificates of `tsa_ca_file`: every one is trusted as a root, as `openssl -CAfile` does.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    certs: Vec<CertificateDer<'static>>,
}

impl TrustAnchors {
    pub fn load(path: &Path) -> Result<TrustAnchors, TsaError> {
        let err = |message: String| TsaError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificate in it".into()));
        }
        Ok(TrustAnchors { certs })
    }
}

/// A TimeStampReq for one checkpoint: SHA-256 imprint, a random nonce, certReq true.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub der: Vec<u8>,
    nonce: Vec<u8>,
}

impl TokenRequest {
    pub fn new(data: &[u8], policy: Option<&str>) -> Result<TokenRequest, TsaError> {
        let malformed = |e: der::Error| TsaError::Malformed(e.to_string());
        let nonce = Uint::new(&rand::random::<u64>().to_be_bytes()).map_err(malformed)?;
        let nonce = Int::from(nonce);
        let req_policy = policy
            .map(ObjectIdentifier::new)
            .transpose()
            .map_err(|e| TsaError::Malformed(e.to_string()))?;
        let req = TimeStampReq {
            version: TspVersion::V1,
            message_imprint: MessageImprint {
                hash_algorithm: sha256_algorithm(),
                hashed_message: OctetString::new(sha2::Sha256::digest(data).to_vec())
                    .map_err(malformed)?,
            },
            req_policy,
            nonce: Some(nonce.clone()),
            cert_req: true,
            extensions: None,
        };
        Ok(TokenRequest {
            der: req.to_der().map_err(malformed)?,
            nonce: nonce.as_bytes().to_vec(),
        })
    }
}

fn sha256_algorithm() -> cms::cert::x509::spki::AlgorithmIdentifier<Any> {
    cms::cert::x509::spki::AlgorithmIdentifier {
        oid: ID_SHA256,
        parameters: Some(Any::null()),
    }
}

/// Sends `request` to the TSA at `url` and returns its answer, checked against `data` (the
/// checkpoint's bytes), the request's nonce, `trust` and `policy`: only a token that verifies
/// is kept.
pub async fn fetch_token(
    url: &str,
    request: &TokenRequest,
    data: &[u8],
    trust: &TrustAnchors,
    policy: Option<&str>,
) -> Result<(Vec<u8>, TokenInfo), TsaError> {
    let unreachable = |e: reqwest::Error| TsaError::Unreachable {
        url: url.to_string(),
        message: crate::http::redact_reqwest(e),
    };
    let client = crate::http::client_builder()
        .timeout(REQUEST_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("lrvault/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(unreachable)?;
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/timestamp-query")
        .body(request.der.clone())
        .send()
        .await
        .map_err(unreachable)?;
    if !response.status().is_success() {
        return Err(TsaError::Http {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    let body = crate::http::read_capped(response, MAX_RESPONSE_BYTES)
        .await
        .map_err(|e| match e {
            crate::http::BodyError::TooLarge => {
                TsaError::Malformed(format!("response larger than {MAX_RESPONSE_BYTES} bytes"))
            }
            crate::http::BodyError::Transport(e) => unreachable(e),
        })?;
    let info = verify_token_policy(&body, data, Some(trust), policy)?;
    if info.nonce.as_deref() != Some(request.nonce.as_slice()) {
        return Err(TsaError::Nonce);
    }
    Ok((body.to_vec(), info))
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// The TSA's time, RFC 3339 UTC.
    pub gen_time: String,
    /// The same, as Unix seconds (for `openssl ts -verify -attime`).
    pub gen_time_unix: u64,
    pub serial: String,
    pub policy: String,
    pub nonce: Option<Vec<u8>>,
    /// Subject of the signing certificate.
    pub signer: String,
    /// The signer's chain was checked against `tsa_ca_file` (always: no token verifies
    /// without it).
    pub chain_checked: bool,
}

/// Checks a stored TimeStampResp (`.tsr`) against the bytes it should timestamp: status,
/// imprint, the CMS signature, and the signer's chain to `trust` at the token's time. Without
/// `trust` no token verifies ([`TsaError::Untrusted`]): the certificates a token carries are
/// never trusted on their own.
pub fn verify_token(
    tsr: &[u8],
    data: &[u8],
    trust: Option<&TrustAnchors>,
) -> Result<TokenInfo, TsaError> {
    let malformed = |what: &str, e: der::Error| TsaError::Malformed(format!("{what}: {e}"));
    let response = TimeStampResp::from_der(tsr).map_err(|e| malformed("TimeStampResp", e))?;
    use cmpv2::status::PkiStatus;
    if !matches!(
        response.status.status,
        PkiStatus::Accepted | PkiStatus::GrantedWithMods
    ) {
        return Err(TsaError::Refused {
            status: format!("{:?}", response.status.status),
        });
    }
    let token: ContentInfo = response
        .time_stamp_token
        .ok_or_else(|| TsaError::Malformed("granted, but no token".into()))?;
    if token.content_type != ID_SIGNED_DATA {
        return Err(TsaError::Malformed(
            "the token is not CMS SignedData".into(),
        ));
    }
    let signed: SignedData = token
        .content
        .decode_as()
        .map_err(|e| malformed("SignedData", e))?;
    if signed.encap_content_info.econtent_type != ID_CT_TST_INFO {
        return Err(TsaError::Malformed(
            "the signed content is not a TSTInfo".into(),
        ));
    }
    let tst_der = signed
        .encap_content_info
        .econtent
        .as_ref()
        .ok_or_else(|| TsaError::Malformed("no TSTInfo in the token".into()))?
        .value()
        .to_vec();
    let tst = TstInfo::from_der(&tst_der).map_err(|e| malformed("TSTInfo", e))?;
    check_imprint(&tst, data)?;
    let [signer_info] = signed.signer_infos.0.as_slice() else {
        return Err(TsaError::Signature(format!(
            "{} signers, expected exactly one",
            signed.signer_infos.0.len()
        )));
    };
    let embedded: Vec<Certificate> = signed
        .certificates
        .iter()
        .flat_map(|set| set.0.iter())
        .filter_map(|choice| match choice {
            CertificateChoices::Certificate(cert) => Some(cert.clone()),
            CertificateChoices::Other(_) => None,
        })
        .collect();
    let Some(trust) = trust else {
        return Err(TsaError::Untrusted);
    };
    let anchors: Vec<Certificate> = trust
        .certs
        .iter()
        .filter_map(|c| Certificate::from_der(c).ok())
        .collect();
    let signer = find_signer(&signer_info.sid, embedded.iter().chain(anchors.iter()))?;
    let signer_der = signer
        .to_der()
        .map_err(|e| malformed("signer certificate", e))?;
    check_signature(signer_info, &tst_der, &signer_der)?;
    let at = tst.gen_time.to_unix_duration();
    let intermediates: Vec<CertificateDer<'static>> = embedded
        .iter()
        .filter_map(|c| c.to_der().ok())
        .map(CertificateDer::from)
        .collect();
    check_chain(&signer_der, &intermediates, trust, at)?;
    Ok(TokenInfo {
        gen_time: crate::time::fmt(chrono::DateTime::UNIX_EPOCH + at),
        gen_time_unix: at.as_secs(),
        serial: hex::encode(tst.serial_number.as_bytes()),
        policy: tst.policy.to_string(),
        nonce: tst.nonce.as_ref().map(|n| n.as_bytes().to_vec()),
        signer: signer.tbs_certificate.subject.to_string(),
        chain_checked: true,
    })
}

/// [`verify_token`], then the token's policy against `policy` (`[anchor] tsa_policy`) when set.
pub fn verify_token_policy(
    tsr: &[u8],
    data: &[u8],
    trust: Option<&TrustAnchors>,
    policy: Option<&str>,
) -> Result<TokenInfo, TsaError> {
    let info = verify_token(tsr, data, trust)?;
    match policy {
        Some(expected) if expected != info.policy => Err(TsaError::Policy {
            expected: expected.to_string(),
            found: info.policy,
        }),
        _ => Ok(info),
    }
}

fn check_imprint(tst: &TstInfo, data: &[u8]) -> Result<(), TsaError> {
    let imprint = &tst.message_imprint;
    let expected = digest(&imprint.hash_algorithm.oid, data).ok_or_else(|| {
        TsaError::Malformed(format!(
            "unsupported imprint algorithm {}",
            imprint.hash_algorithm.oid
        ))
    })?;
    let found = imprint.hashed_message.as_bytes();
    if found != expected.as_slice() {
        return Err(TsaError::Imprint {
            expected: hex::encode(expected),
            found: hex::encode(found),
        });
    }
    Ok(())
}

fn digest(algorithm: &ObjectIdentifier, data: &[u8]) -> Option<Vec<u8>> {
    match *algorithm {
        ID_SHA256 => Some(sha2::Sha256::digest(data).to_vec()),
        ID_SHA384 => Some(sha2::Sha384::digest(data).to_vec()),
        ID_SHA512 => Some(sha2::Sha512::digest(data).to_vec()),
        _ => None,
    }
}

fn find_signer<'c>(
    sid: &SignerIdentifier,
    mut certs: impl Iterator<Item = &'c Certificate>,
) -> Result<&'c Certificate, TsaError> {
    let found = certs.find(|cert| match sid {
        SignerIdentifier::IssuerAndSerialNumber(id) => {
            cert.tbs_certificate.issuer == id.issuer
                && cert.tbs_certificate.serial_number == id.serial_number
        }
        SignerIdentifier::SubjectKeyIdentifier(ski) => cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .filter(|ext| ext.extn_id == ID_SUBJECT_KEY_ID)
            .any(|ext| {
                cms::cert::x509::ext::pkix::SubjectKeyIdentifier::from_der(
                    ext.extn_value.as_bytes(),
                )
                .is_ok_and(|found| &found == ski)
            }),
    });
    found.ok_or_else(|| {
        TsaError::Signature(
            "the signer's certificate is neither in the token nor in tsa_ca_file".into(),
        )
    })
}

/// The signed attributes must carry the TSTInfo's digest, and the signer's key must verify
/// the signature over them (RFC 5652 §5.4: re-encoded as a SET OF).
fn check_signature(info: &SignerInfo, tst_der: &[u8], signer_der: &[u8]) -> Result<(), TsaError> {
    let attrs = info
        .signed_attrs
        .as_ref()
        .ok_or_else(|| TsaError::Signature("no signed attributes".into()))?;
    let digest_alg = &info.digest_alg.oid;
    let content_digest = digest(digest_alg, tst_der)
        .ok_or_else(|| TsaError::Signature(format!("unsupported digest algorithm {digest_alg}")))?;
    let message_digest = attrs
        .iter()
        .find(|attr| attr.oid == ID_MESSAGE_DIGEST)
        .and_then(|attr| attr.values.iter().next())
        .and_then(|value| value.decode_as::<OctetString>().ok())
        .ok_or_else(|| TsaError::Signature("no message-digest attribute".into()))?;
    if message_digest.as_bytes() != content_digest.as_slice() {
        return Err(TsaError::Signature(
            "the message-digest attribute does not match the TSTInfo".into(),
        ));
    }
    let signed_bytes = attrs
        .to_der()
        .map_err(|e| TsaError::Signature(e.to_string()))?;
    let cert = CertificateDer::from(signer_der);
    let signer = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| TsaError::Signature(format!("signer certificate: {e:?}")))?;
    let signature = info.signature.as_bytes();
    let candidates = signature_algorithms(&info.signature_algorithm.oid, digest_alg);
    if candidates.is_empty() {
        return Err(TsaError::Signature(format!(
            "unsupported signature algorithm {}",
            info.signature_algorithm.oid
        )));
    }
    let verified = candidates.iter().any(|alg| {
        signer
            .verify_signature(*alg, &signed_bytes, signature)
            .is_ok()
    });
    if verified {
        Ok(())
    } else {
        Err(TsaError::Signature(
            "the signer's key does not verify the signature".into(),
        ))
    }
}

/// The webpki algorithms that can check a CMS signature declared as `signature_alg` over a
/// `digest_alg` digest (the key's own algorithm picks among them).
fn signature_algorithms(
    signature_alg: &ObjectIdentifier,
    digest_alg: &ObjectIdentifier,
) -> Vec<&'static dyn SignatureVerificationAlgorithm> {
    use webpki::ring as alg;
    let by_hash = |sha256, sha384, sha512| match *digest_alg {
        ID_SHA256 => vec![sha256],
        ID_SHA384 => vec![sha384],
        ID_SHA512 => vec![sha512],
        _ => vec![],
    };
    let ecdsa = |hash: &str| -> Vec<&'static dyn SignatureVerificationAlgorithm> {
        match hash {
            "256" => vec![alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            "384" => vec![alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
            // ring verifies ECDSA over P-256 and P-384 with SHA-256/384 only: a P-521 key or
            // an ECDSA signature over SHA-512 is refused as unsupported (docs/audit.md).
            _ => vec![],
        }
    };
    let digest_hash = match *digest_alg {
        ID_SHA256 => "256",
        ID_SHA384 => "384",
        _ => "512",
    };
    match signature_alg.to_string().as_str() {
        // rsaEncryption: the hash is the SignerInfo's digest algorithm.
        "1.2.840.113549.1.1.1" => by_hash(
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
        ),
        "1.2.840.113549.1.1.11" => vec![alg::RSA_PKCS1_2048_8192_SHA256],
        "1.2.840.113549.1.1.12" => vec![alg::RSA_PKCS1_2048_8192_SHA384],
        "1.2.840.113549.1.1.13" => vec![alg::RSA_PKCS1_2048_8192_SHA512],
        "1.2.840.113549.1.1.10" => by_hash(
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        ),
        "1.2.840.10045.4.3.2" => ecdsa("256"),
        "1.2.840.10045.4.3.3" => ecdsa("384"),
        "1.2.840.10045.4.3.4" => ecdsa("512"),
        // id-ecPublicKey: the hash is the SignerInfo's digest algorithm.
        "1.2.840.10045.2.1" => ecdsa(digest_hash),
        "1.3.101.112" => vec![alg::ED25519],
        _ => vec![],
    }
}

fn check_chain(
    signer_der: &[u8],
    intermediates: &[CertificateDer<'static>],
    trust: &TrustAnchors,
    at: Duration,
) -> Result<(), TsaError> {
    let cert = CertificateDer::from(signer_der);
    let signer = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| TsaError::Chain(format!("signer certificate: {e:?}")))?;
    let anchors: Vec<_> = trust
        .certs
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    signer
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            UnixTime::since_unix_epoch(at),
            webpki::KeyUsage::required(TIME_STAMPING_EKU),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| TsaError::Chain(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_imprint_nonce_policy_and_cert_req() {
        let req = TokenRequest::new(b"checkpoint bytes", Some("1.2.3.4.1")).unwrap();
        let parsed = TimeStampReq::from_der(&req.der).unwrap();
        assert_eq!(parsed.version, TspVersion::V1);
        assert_eq!(parsed.message_imprint.hash_algorithm.oid, ID_SHA256);
        assert_eq!(
            parsed.message_imprint.hashed_message.as_bytes(),
            sha2::Sha256::digest(b"checkpoint bytes").as_slice()
        );
        assert_eq!(parsed.req_policy.unwrap().to_string(), "1.2.3.4.1");
        assert!(parsed.cert_req);
        assert_eq!(parsed.nonce.unwrap().as_bytes(), req.nonce.as_slice());
        assert!(TokenRequest::new(b"x", Some("not-an-oid")).is_err());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for bytes in [&b""[..], b"\x30\x03\x02\x01\x00", b"not der at all"] {
            assert!(matches!(
                verify_token(bytes, b"data", None),
                Err(TsaError::Malformed(_) | TsaError::Refused { .. })
            ));
        }
    }
}
