#!/bin/sh
# Renders nginx.conf.template into nginx.conf for the MQTT edge.
#
#   AUTH=key|x509 LISTEN=host:port UPSTREAM=host:port SERVER_CERT=... SERVER_KEY=...
#   CLIENT_CA=... [PLAIN_LISTEN=host:port] [MODULES=dir] [RUN_DIR=dir]
#   [SINGLE_PROCESS=1] render.sh OUT
#
# AUTH=key (default): TLS with a server certificate; the broker checks
# username and password. AUTH=x509: nginx also requires a client certificate
# from CLIENT_CA, and mqtt_auth.js checks that the password ends with its CN.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: render.sh OUT}
: "${LISTEN:?}" "${UPSTREAM:?}" "${SERVER_CERT:?}" "${SERVER_KEY:?}"
AUTH=${AUTH:-key}
MODULES=${MODULES:-/usr/lib/nginx/modules}
RUN_DIR=${RUN_DIR:-/tmp}
JS=${JS:-$here/mqtt_auth.js}

case "$AUTH" in
  x509)
    : "${CLIENT_CA:?AUTH=x509 needs CLIENT_CA}"
    client_auth="        ssl_client_certificate $CLIENT_CA;
        ssl_verify_client on;
        ssl_verify_depth 2;
        js_preread mqtt_auth.authenticate;"
    ;;
  key) client_auth="" ;;
  *) echo "render.sh: AUTH=$AUTH: use key or x509" >&2; exit 2 ;;
esac
plain=""
if [ -n "${PLAIN_LISTEN:-}" ]; then
  plain="server { listen $PLAIN_LISTEN; proxy_pass $UPSTREAM; }"
fi
# Debian builds the stream module as a dynamic module; images that compile
# it in have no file to load.
load_stream=""
if [ -e "$MODULES/ngx_stream_module.so" ]; then
  load_stream="load_module $MODULES/ngx_stream_module.so;"
fi
master="master_process on;"
if [ "${SINGLE_PROCESS:-0}" = 1 ]; then
  # Tests run nginx as one process, so that killing it stops everything.
  master="master_process off;"
fi

# awk, not sed: the replacement for @CLIENT_AUTH@ spans lines.
awk -v modules="$MODULES" -v run_dir="$RUN_DIR" -v js="$JS" -v listen="$LISTEN" \
    -v upstream="$UPSTREAM" -v cert="$SERVER_CERT" -v key="$SERVER_KEY" \
    -v client_auth="$client_auth" -v plain="$plain" -v master="$master" -v load_stream="$load_stream" '
  {
    gsub(/@MODULES@/, modules); gsub(/@RUN_DIR@/, run_dir); gsub(/@JS@/, js)
    gsub(/@LISTEN@/, listen); gsub(/@UPSTREAM@/, upstream)
    gsub(/@SERVER_CERT@/, cert); gsub(/@SERVER_KEY@/, key)
    gsub(/@PLAIN_SERVER@/, plain); gsub(/@MASTER_PROCESS@/, master); gsub(/@LOAD_STREAM@/, load_stream)
    if ($0 ~ /^@CLIENT_AUTH@$/) { print client_auth; next }
    print
  }' "$here/nginx.conf.template" > "$out"
