//! Key kinds: known by name, validated when committed, generated fresh.

use crate::error::{Error, Kind, Result};
use crate::secret::SecretBytes;
use p256::pkcs8::{
    DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, LineEnding,
};

/// Largest secret keyfs stores.
pub const MAX_SECRET: usize = 64 * 1024;

/// What a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Anything else: 0 to 64 KiB of bytes.
    Opaque = 0,
    /// P-256 private key, PKCS#8 (or SEC1) PEM.
    EcPrivate = 1,
    /// P-256 public key, SPKI PEM.
    EcPublic = 2,
    /// 32 random bytes.
    Sym32 = 3,
}

impl KeyKind {
    /// From the stored code.
    pub fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            0 => KeyKind::Opaque,
            1 => KeyKind::EcPrivate,
            2 => KeyKind::EcPublic,
            3 => KeyKind::Sym32,
            _ => {
                return Err(Error::new(
                    Kind::Integrity,
                    format!("unknown key kind code {c} (corrupted record)"),
                ))
            }
        })
    }
    /// The kind a file name implies.
    pub fn for_name(name: &[u8]) -> Self {
        match name {
            b"storage" | b"poison_key" => KeyKind::EcPrivate,
            b"storage.pub" | b"poison_key.pub" => KeyKind::EcPublic,
            b"storage_sym" | b"hmac" | b"poison_key_sym" | b"secure_log_key" => KeyKind::Sym32,
            _ => KeyKind::Opaque,
        }
    }
    /// Short name for listings and xattrs.
    pub fn label(self) -> &'static str {
        match self {
            KeyKind::Opaque => "opaque",
            KeyKind::EcPrivate => "p256-private",
            KeyKind::EcPublic => "p256-public",
            KeyKind::Sym32 => "symmetric-32",
        }
    }
    /// Public kinds are 0644 and exported without `--private`.
    pub fn is_public(self) -> bool {
        self == KeyKind::EcPublic
    }
}

/// The derived public key's file name for a private key's name.
pub fn public_name(private: &[u8]) -> Option<&'static [u8]> {
    match private {
        b"storage" => Some(b"storage.pub"),
        b"poison_key" => Some(b"poison_key.pub"),
        _ => None,
    }
}

/// The private key's name for a derived public key's name.
pub fn private_name(public: &[u8]) -> Option<&'static [u8]> {
    match public {
        b"storage.pub" => Some(b"storage"),
        b"poison_key.pub" => Some(b"poison_key"),
        _ => None,
    }
}

fn parse_private(m: &[u8]) -> Option<p256::SecretKey> {
    let s = std::str::from_utf8(m).ok()?;
    p256::SecretKey::from_pkcs8_pem(s)
        .ok()
        .or_else(|| p256::SecretKey::from_sec1_pem(s).ok())
}

/// Validate `material` for `kind`. For a private key, returns its public key (SPKI PEM).
pub fn validate(kind: KeyKind, material: &[u8], what: &str) -> Result<Option<Vec<u8>>> {
    if material.len() > MAX_SECRET {
        return Err(Error::new(
            Kind::TooBig,
            format!(
                "{what}: {} bytes is over the 64 KiB limit for a secret",
                material.len()
            ),
        ));
    }
    match kind {
        KeyKind::Opaque => Ok(None),
        KeyKind::Sym32 => {
            if material.len() == 32 {
                Ok(None)
            } else {
                Err(Error::new(
                    Kind::Invalid,
                    format!("{what}: a symmetric key must be exactly 32 bytes, got {}; nothing was changed (generate one with `head -c 32 /dev/urandom`)", material.len()),
                ))
            }
        }
        KeyKind::EcPrivate => {
            let sk = parse_private(material).ok_or_else(|| {
                Error::new(
                    Kind::Invalid,
                    format!("{what}: not a P-256 private key in PKCS#8 or SEC1 PEM; nothing was changed (create one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)"),
                )
            })?;
            Ok(Some(public_pem(&sk)))
        }
        KeyKind::EcPublic => {
            let ok = std::str::from_utf8(material)
                .ok()
                .and_then(|s| p256::PublicKey::from_public_key_pem(s).ok())
                .is_some();
            if ok {
                Ok(None)
            } else {
                Err(Error::new(
                    Kind::Invalid,
                    format!("{what}: not a P-256 public key in SPKI PEM; nothing was changed (derive one with `openssl pkey -pubout`)"),
                ))
            }
        }
    }
}

fn public_pem(sk: &p256::SecretKey) -> Vec<u8> {
    sk.public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("encoding a valid P-256 public key cannot fail")
        .into_bytes()
}

/// Generate fresh material for `kind`; opaque secrets get 32 random bytes.
pub fn generate(kind: KeyKind) -> SecretBytes {
    match kind {
        KeyKind::EcPrivate => loop {
            let mut raw = zeroize::Zeroizing::new([0u8; 32]);
            crate::crypto::fill_random(&mut raw[..]);
            if let Ok(sk) = p256::SecretKey::from_slice(&raw[..]) {
                let pem = sk
                    .to_pkcs8_pem(LineEnding::LF)
                    .expect("encoding a valid P-256 key cannot fail");
                break SecretBytes::from_slice(pem.as_bytes());
            }
        },
        KeyKind::EcPublic => {
            let sk = generate(KeyKind::EcPrivate);
            let pk = validate(KeyKind::EcPrivate, sk.expose(), "generated")
                .expect("valid")
                .expect("public");
            SecretBytes::new(pk)
        }
        KeyKind::Sym32 | KeyKind::Opaque => {
            let mut v = vec![0u8; 32];
            crate::crypto::fill_random(&mut v);
            SecretBytes::new(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_by_name() {
        assert_eq!(KeyKind::for_name(b"storage"), KeyKind::EcPrivate);
        assert_eq!(KeyKind::for_name(b"storage.pub"), KeyKind::EcPublic);
        assert_eq!(KeyKind::for_name(b"hmac"), KeyKind::Sym32);
        assert_eq!(KeyKind::for_name(b"tls.crt"), KeyKind::Opaque);
        assert_eq!(public_name(b"poison_key"), Some(&b"poison_key.pub"[..]));
        assert_eq!(private_name(b"storage.pub"), Some(&b"storage"[..]));
        for c in 0..4 {
            assert_eq!(KeyKind::from_code(c).unwrap() as u8, c);
        }
        assert_eq!(KeyKind::from_code(9).unwrap_err().kind(), Kind::Integrity);
    }

    #[test]
    fn validation() {
        let sk = generate(KeyKind::EcPrivate);
        let pk = validate(KeyKind::EcPrivate, sk.expose(), "k")
            .unwrap()
            .unwrap();
        assert!(pk.starts_with(b"-----BEGIN PUBLIC KEY-----"));
        assert!(validate(KeyKind::EcPublic, &pk, "k").unwrap().is_none());
        assert_eq!(
            validate(KeyKind::EcPublic, sk.expose(), "k")
                .unwrap_err()
                .kind(),
            Kind::Invalid
        );
        assert_eq!(
            validate(KeyKind::EcPrivate, b"junk", "k")
                .unwrap_err()
                .kind(),
            Kind::Invalid
        );
        assert_eq!(
            validate(KeyKind::Sym32, &[0; 31], "k").unwrap_err().kind(),
            Kind::Invalid
        );
        assert!(validate(KeyKind::Sym32, &[0; 32], "k").is_ok());
        assert!(validate(KeyKind::Opaque, &[0; MAX_SECRET], "k").is_ok());
        assert_eq!(
            validate(KeyKind::Opaque, &vec![0; MAX_SECRET + 1], "k")
                .unwrap_err()
                .kind(),
            Kind::TooBig
        );
        assert_eq!(generate(KeyKind::Sym32).len(), 32);
        let a = generate(KeyKind::Sym32);
        let b = generate(KeyKind::Sym32);
        assert_ne!(a.expose(), b.expose());
    }
}
