// oidc-provider based OAuth 2.0 authorization server for tokend interop tests.
//
// Usage: node server.mjs [PORT]        (PORT 0 or absent = pick a free port)
//
// Prints exactly one line to stdout once listening:  READY http://127.0.0.1:PORT
// Everything else (oidc-provider notices, errors) goes to stderr.
// Exits when stdin reaches EOF/closes, or on SIGTERM/SIGINT/SIGHUP, so a test
// harness that dies (and thereby closes our stdin pipe) does not leak us.
//
// private_key_jwt clients are registered when the test passes their public
// keys (PEM) in PKJWT_RSA_PUBLIC_KEY and PKJWT_EC_PUBLIC_KEY. The reason for
// each client authentication failure (oidc-provider's error_detail, which
// the HTTP answer leaves out) is written to stderr as
// `oidc server: grant.error: invalid_client: <detail>`.
//
// mTLS (RFC 8705): when MTLS_SERVER_CERT and MTLS_SERVER_KEY (PEM) are set,
// the server speaks HTTPS with them (READY https://…), asks every client for
// a certificate, and checks it against MTLS_CLIENT_CA (PEM). Without
// MTLS_REJECT_UNAUTHORIZED=1 a certificate the CA did not sign still
// completes the handshake and oidc-provider refuses it (invalid_client);
// with it, node drops the connection after the handshake, without a TLS
// alert. It registers
// `tokend-mtls` (tls_client_auth, subject DN MTLS_SUBJECT_DN, tokens bound
// to the certificate) and, when
// MTLS_SELF_SIGNED_CERT (PEM) is set, `tokend-mtls-self`
// (self_signed_tls_client_auth with that certificate).

import { createPublicKey, generateKeyPairSync, X509Certificate } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';

// oidc-provider writes some notices with console.info (stdout). stdout is
// reserved for the READY line, so route every console output to stderr.
for (const name of ['log', 'info', 'debug']) {
  // eslint-disable-next-line no-console
  console[name] = (...args) => console.error(...args);
}

const { default: Provider, errors } = await import('oidc-provider');

const HOST = '127.0.0.1';
const RESOURCE = 'urn:tokend:test';
// Resource servers a client may name (RFC 8707): each gets tokens whose
// `aud` is its indicator. RESOURCE is also the default.
const RESOURCES = new Set([RESOURCE, 'https://api.example/', 'https://billing.example/']);
const RESOURCE_SCOPES = 'gateway vault fx';
const ACCESS_TOKEN_TTL = 300;

let server;
let exiting = false;
function shutdown(reason, code = 0) {
  if (exiting) return;
  exiting = true;
  process.stderr.write(`oidc server: exiting (${reason})\n`);
  if (server) {
    server.closeAllConnections?.();
    server.close();
  }
  // Do not wait for keep-alive sockets or anything else.
  setImmediate(() => process.exit(code));
}

for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP']) {
  process.on(sig, () => shutdown(sig));
}
process.stdin.on('end', () => shutdown('stdin EOF'));
process.stdin.on('close', () => shutdown('stdin closed'));
process.stdin.on('error', () => shutdown('stdin error'));
process.stdin.resume(); // consume (and discard) anything written to stdin

const portArg = process.argv[2] ?? '0';
const port = Number(portArg);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`oidc server: invalid port ${JSON.stringify(portArg)}\n`);
  process.exit(2);
}

// Listen first so that the issuer can contain the real port when port 0 is used.
let handler = (_req, res) => {
  res.statusCode = 503;
  res.end();
};
const mtls = process.env.MTLS_SERVER_CERT && {
  cert: process.env.MTLS_SERVER_CERT,
  key: process.env.MTLS_SERVER_KEY,
  ca: process.env.MTLS_CLIENT_CA,
  requestCert: true,
  rejectUnauthorized: process.env.MTLS_REJECT_UNAUTHORIZED === '1',
};
server = mtls
  ? https.createServer(mtls, (req, res) => handler(req, res))
  : http.createServer((req, res) => handler(req, res));
server.on('error', (err) => {
  process.stderr.write(`oidc server: ${err.stack || err}\n`);
  shutdown('server error', 1);
});
await new Promise((resolve) => server.listen(port, HOST, resolve));
const issuer = `${mtls ? 'https' : 'http'}://${HOST}:${server.address().port}`;

// Fresh signing key per run (avoids the "development-only signing keys" path).
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingJwk = { ...privateKey.export({ format: 'jwk' }), kid: 'tokend-test-rs256', use: 'sig', alg: 'RS256' };

const client = (client_id, client_secret, scope, method = 'client_secret_basic') => ({
  client_id,
  client_secret,
  scope,
  token_endpoint_auth_method: method,
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
});

// A client that authenticates with a JWT signed by the private half of the
// PEM public key in environment variable `env`; none when it is unset.
const jwtClient = (client_id, env, kid) => {
  const pem = process.env[env];
  if (!pem) return [];
  const jwk = { ...createPublicKey(pem).export({ format: 'jwk' }), ...(kid && { kid }) };
  const { client_secret: _, ...rest } = client(client_id, undefined, 'gateway vault fx', 'private_key_jwt');
  return [{ ...rest, jwks: { keys: [jwk] } }];
};

// The certificate the client presented on this request's connection.
const peerCertificate = (ctx) => {
  const peer = ctx.socket.getPeerCertificate?.();
  return peer?.raw ? new X509Certificate(peer.raw) : undefined;
};

// RFC 8705 clients, registered only when the server speaks mTLS.
const mtlsClients = () => {
  if (!mtls) return [];
  const base = (client_id, method) => {
    const { client_secret: _, ...rest } = client(client_id, undefined, 'gateway vault fx', method);
    return rest;
  };
  const clients = [{
    ...base('tokend-mtls', 'tls_client_auth'),
    tls_client_auth_subject_dn: process.env.MTLS_SUBJECT_DN,
    // Its tokens name the certificate (cnf.x5t#S256, RFC 8705 3): proof of
    // which one tokend presented.
    tls_client_certificate_bound_access_tokens: true,
  }];
  const selfSigned = process.env.MTLS_SELF_SIGNED_CERT;
  if (selfSigned) {
    const cert = new X509Certificate(selfSigned);
    // oidc-provider matches the certificate by the x5c's thumbprint.
    const jwk = { ...cert.publicKey.export({ format: 'jwk' }), x5c: [cert.raw.toString('base64')] };
    clients.push({ ...base('tokend-mtls-self', 'self_signed_tls_client_auth'), jwks: { keys: [jwk] } });
  }
  return clients;
};

const mtlsFeature = {
  enabled: true,
  certificateBoundAccessTokens: true,
  tlsClientAuth: true,
  selfSignedTlsClientAuth: true,
  getCertificate: peerCertificate,
  // Node checked the chain against MTLS_CLIENT_CA during the handshake.
  certificateAuthorized: (ctx) => ctx.socket.authorized === true,
  // Only the subject DN is registered; node writes it one RDN per line.
  certificateSubjectMatches: (ctx, property, expected) => property === 'tls_client_auth_subject_dn'
    && peerCertificate(ctx)?.subject.split('\n').join(',') === expected,
};

const configuration = {
  clients: [
    client('tokend-plain', 'plain-secret-0123456789', 'gateway vault fx'),
    client('tok:en+d%id with/space', 's3cr:et+with%percent and/slash', 'gateway vault'),
    client('tokend-narrow', 'narrow-secret-42', 'gateway'),
    client('tokend-post', 'post-secret-7', 'gateway', 'client_secret_post'),
    ...jwtClient('tokend-jwt-rsa', 'PKJWT_RSA_PUBLIC_KEY', 'tokend-rsa-1'),
    ...jwtClient('tokend-jwt-ec', 'PKJWT_EC_PUBLIC_KEY'),
    ...mtlsClients(),
  ],
  // Scopes listed here are "static": a client asking for one that is not in
  // its own `scope` metadata gets invalid_scope. Unknown scopes are dropped.
  scopes: ['openid', 'offline_access', ...RESOURCE_SCOPES.split(' ')],
  jwks: { keys: [signingJwk] },
  cookies: { keys: ['tokend-test-only-cookie-key'] }, // silences a warning; cookies are unused
  ttl: { ClientCredentials: ACCESS_TOKEN_TTL },
  ...(mtls && {
    clientAuthMethods: [
      'client_secret_basic', 'client_secret_jwt', 'client_secret_post', 'private_key_jwt', 'none',
      'tls_client_auth', 'self_signed_tls_client_auth',
    ],
  }),
  features: {
    ...(mtls && { mTLS: mtlsFeature }),
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      // Requests without a `resource` parameter get tokens for RESOURCE.
      defaultResource: () => RESOURCE,
      getResourceServerInfo: (_ctx, resourceIndicator) => {
        if (!RESOURCES.has(resourceIndicator)) {
          throw new errors.InvalidTarget();
        }
        return {
          scope: RESOURCE_SCOPES,
          audience: resourceIndicator,
          accessTokenTTL: ACCESS_TOKEN_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
};

const provider = new Provider(issuer, configuration);
provider.on('server_error', (_ctx, err) => {
  process.stderr.write(`oidc server: server_error: ${err.stack || err}\n`);
});
provider.on('grant.error', (_ctx, err) => {
  process.stderr.write(`oidc server: grant.error: ${err.error}: ${err.error_detail ?? err.error_description}\n`);
});
handler = provider.callback();

process.stdout.write(`READY ${issuer}\n`);
