//! Reading a local file with a size bound. Config, keyring, credential and certificate files are
//! the operator's, but a wrong path (a device, a log, a huge file) must fail with a message
//! instead of filling memory, so every file kmsgate reads goes through [`read_capped`].

use std::{io::Read, path::Path};

use zeroize::Zeroizing;

/// A credential file: a token, a role_id or secret_id, a JWT, a password.
pub const CREDENTIAL_MAX_BYTES: u64 = 64 * 1024;
/// A config file, a PEM certificate bundle or key, /etc/group.
pub const DOCUMENT_MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Reads at most `max` bytes of `path`; a longer file is an `InvalidData` error naming the bound.
/// The buffer is zeroized on drop and sized once up front, so a secret leaves no stray copies
/// behind a reallocation.
pub fn read_capped(path: &Path, max: u64) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    let hint = file.metadata().map(|m| m.len()).unwrap_or(0).min(max);
    // NB: `hint` is at most `max`, a small constant, so the conversion cannot truncate.
    let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(hint).unwrap_or(0) + 1));
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// [`read_capped`] for a UTF-8 text file.
pub fn read_text_capped(path: &Path, max: u64) -> std::io::Result<Zeroizing<String>> {
    let bytes = read_capped(path, max)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not UTF-8"))?;
    Ok(Zeroizing::new(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_bound_and_refuses_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_capped(&path, 5).unwrap().as_slice(), b"12345");
        let err = read_capped(&path, 4).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("larger than 4 bytes"), "{err}");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(read_text_capped(&path, 10).unwrap_err().to_string().contains("UTF-8"));
    }

    #[test]
    fn an_endless_file_is_cut_at_the_bound() {
        // /dev/zero never ends: an unbounded read would never return.
        let err = read_capped(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(err.to_string().contains("larger than 1024 bytes"), "{err}");
    }
}
