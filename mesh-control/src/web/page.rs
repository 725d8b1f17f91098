//! The page itself, embedded in the binary (works offline, nothing from a
//! CDN): the app's HTML and its hand-written script, and the login form.

/// The app (signed in): the layout; `app.js` fills it.
pub const APP_HTML: &str = include_str!("app.html");

/// The app's script: polls `/api/snapshot` and draws the SVG topology and
/// the tables.
pub const APP_JS: &str = include_str!("app.js");

/// The login form; `failed` adds the refusal.
#[must_use]
pub fn login(failed: bool) -> String {
    let error = if failed { "<p id=\"login-error\" class=\"err\">That token was refused.</p>" } else { "" };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>meshgate: sign in</title>\
         <style>body{{font:15px system-ui,sans-serif;margin:4em auto;max-width:28em}}\
         input{{width:100%;font:inherit;padding:.4em;box-sizing:border-box}}.err{{color:#b00}}</style></head>\
         <body><h1>meshgate</h1><p>Sign in with an admin API token (<code>meshctl tokens create</code>).</p>\
         {error}<form method=\"post\" action=\"/login\" id=\"login\">\
         <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"off\" placeholder=\"mat1....\" autofocus>\
         <p><button type=\"submit\" id=\"sign-in\">Sign in</button></p></form></body></html>"
    )
}

/// The value of `name` in an `application/x-www-form-urlencoded` body.
#[must_use]
pub fn form_field(form: &str, name: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (decode(k)? == name).then(|| decode(v)).flatten()
    })
}

/// Percent-decoding with `+` as a space; None on a malformed escape or
/// bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = char::from(bytes.next()?).to_digit(16)?;
                let lo = char::from(bytes.next()?).to_digit(16)?;
                u8::try_from(hi * 16 + lo).ok()?
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields() {
        assert_eq!(form_field("token=mat1.ab-c_d.e", "token").as_deref(), Some("mat1.ab-c_d.e"));
        assert_eq!(form_field("x=1&token=a%2Bb+c", "token").as_deref(), Some("a+b c"));
        assert_eq!(form_field("x=1", "token"), None);
        assert_eq!(form_field("token=%zz", "token"), None);
        assert_eq!(form_field("token=%e2", "token"), None);
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(login(true).contains("login-error"));
        assert!(!login(false).contains("login-error"));
        // Nothing fetched from elsewhere: the page must work offline.
        for text in [APP_HTML, APP_JS] {
            // The SVG namespace is a name, never fetched.
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://") && !text.contains("https://"), "no external URL");
        }
        assert!(APP_HTML.contains("src=\"/app.js\""));
    }
}
