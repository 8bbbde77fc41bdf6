// js_preread check of the mTLS edge: allow the connection only when the MQTT
// CONNECT password ends with the client certificate's CN. A refusal closes the
// stream; the client never gets a CONNACK. Never logs the CN or the password:
// under Magistrala mTLS both are the client secret.

function byteAt(data, i) {
    return typeof data === 'string' ? data.charCodeAt(i) : data[i];
}

function bytesAsString(data, start, end) {
    return typeof data === 'string' ? data.substring(start, end) : data.slice(start, end).toString('latin1');
}

// The password field of an MQTT 3.1.1 CONNECT, or null.
function connectPassword(data) {
    if (data.length < 2 || (byteAt(data, 0) & 0xf0) !== 0x10) {
        return null;
    }
    var pos = 1, remaining = 0, shift = 0, b;
    do {
        b = byteAt(data, pos++);
        remaining += (b & 0x7f) << shift;
        shift += 7;
    } while ((b & 0x80) && pos < 5);
    if (data.length < pos + remaining) {
        return null; // the whole CONNECT must arrive in the first chunk
    }
    function field() {
        var len = (byteAt(data, pos) << 8) | byteAt(data, pos + 1);
        var value = bytesAsString(data, pos + 2, pos + 2 + len);
        pos += 2 + len;
        return value;
    }
    field(); // protocol name
    pos += 1; // protocol level
    var flags = byteAt(data, pos);
    pos += 3; // flags, keep-alive
    if ((flags & 0xc0) !== 0xc0) {
        return null; // username and password are both required
    }
    field(); // client id
    if (flags & 0x04) {
        field(); // will topic
        field(); // will message
    }
    field(); // username
    return field();
}

function commonName(dn) {
    var parts = (dn || '').split(',');
    for (var i = 0; i < parts.length; i++) {
        if (parts[i].indexOf('CN=') === 0) {
            return parts[i].substring(3);
        }
    }
    return '';
}

function authenticate(s) {
    if (s.variables.ssl_client_verify !== 'SUCCESS') {
        s.deny();
        return;
    }
    var cn = commonName(s.variables.ssl_client_s_dn);
    s.on('upload', function (data, flags) {
        if (data.length === 0) {
            return;
        }
        var password = connectPassword(data);
        s.off('upload');
        if (password === null || cn === '' || password.slice(-cn.length) !== cn) {
            s.error('mqtt_auth: denied: CONNECT password does not end with the certificate CN');
            s.deny();
            return;
        }
        s.allow();
    });
}

export default { authenticate };
