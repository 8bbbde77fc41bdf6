//! The one `multipart/form-data` request the API takes: `PUT
//! /tasks/{id}/upload` with a `.wasm` in the form field `file`, as upstream's
//! manager takes it. The body is already read whole and bounded, so a
//! buffered parser is enough.

/// The file of the form field `field`: its file name and bytes.
///
/// # Errors
///
/// One line saying what is missing or malformed.
pub fn file_field<'a>(
    content_type: &str,
    body: &'a [u8],
    field: &str,
) -> Result<(String, &'a [u8]), String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|_| content_type.trim_start().starts_with("multipart/form-data"))
        .ok_or("the body is not multipart/form-data with a boundary: send the module as curl -F file=@add.wasm does")?;
    let delimiter = format!("--{boundary}");
    let mut rest = body;
    // Each part starts after a delimiter line; the last delimiter ends in "--".
    while let Some(at) = find(rest, delimiter.as_bytes()) {
        rest = &rest[at + delimiter.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let rest_part = rest.strip_prefix(b"\r\n").unwrap_or(rest);
        let headers_end =
            find(rest_part, b"\r\n\r\n").ok_or("a form part has no end of headers")?;
        let headers = String::from_utf8_lossy(&rest_part[..headers_end]);
        let content = &rest_part[headers_end + 4..];
        let content_end = find(content, format!("\r\n{delimiter}").as_bytes())
            .ok_or("a form part is not closed by the boundary")?;
        let disposition = headers
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .unwrap_or_default();
        if parameter(disposition, "name").as_deref() == Some(field) {
            let filename = parameter(disposition, "filename").unwrap_or_default();
            return Ok((filename, &content[..content_end]));
        }
        rest = &content[content_end..];
    }
    Err(format!(
        "the form has no field {field:?}: send the module as -F {field}=@add.wasm"
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `name="value"` in a Content-Disposition header.
fn parameter(header: &str, name: &str) -> Option<String> {
    header.split(';').map(str::trim).find_map(|p| {
        let (key, value) = p.split_once('=')?;
        (key.trim() == name).then(|| value.trim().trim_matches('"').to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    #[test]
    fn finds_the_file_among_fields() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"add.wasm\"\r\nContent-Type: application/octet-stream\r\n\r\n\0asm\x01\0\0\0\r\n--XyZ--\r\n";
        let (name, bytes) = file_field(TYPE, body, "file").unwrap();
        assert_eq!(name, "add.wasm");
        assert_eq!(bytes, b"\0asm\x01\0\0\0");
    }

    #[test]
    fn malformed_forms_are_errors() {
        assert!(file_field("application/json", b"", "file").is_err());
        let no_field =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--XyZ--\r\n";
        assert!(file_field(TYPE, no_field, "file")
            .unwrap_err()
            .contains("no field"));
        let unclosed = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n1";
        assert!(file_field(TYPE, unclosed, "file").is_err());
        assert!(file_field(TYPE, b"garbage", "file").is_err());
    }
}
