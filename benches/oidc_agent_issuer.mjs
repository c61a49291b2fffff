// The issuer for the oidc-agent comparison in benches/bench.rs.
//
// oidc-agent serves tokens minted from a refresh token, and a refresh token
// is normally had through a browser login. This runs the pinned
// oidc-provider (tests/oidc's node_modules), registers one confidential
// client with the authorization_code and refresh_token grants, and creates
// the Grant and RefreshToken a login would have left in the in-memory
// adapter, so oidc-gen can take the refresh token with --rt.
//
// Usage: node benches/oidc_agent_issuer.mjs   (run with NODE_PATH or from a
// directory that resolves tests/oidc/node_modules)
// Prints one line, `READY ISSUER CLIENT_ID CLIENT_SECRET REFRESH_TOKEN`, and
// serves until SIGTERM or stdin closes.

for (const name of ['log', 'info', 'debug', 'warn']) {
  console[name] = (...args) => console.error(...args);
}

import { createRequire } from 'node:module';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '../tests/oidc/package.json'));
const { default: Provider } = await import(require.resolve('oidc-provider'));

const CLIENT_ID = 'bench-agent';
const CLIENT_SECRET = 'bench-agent-secret-0123456789';
const SCOPE = 'openid offline_access a';

const stop = () => process.exit(0);
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, stop);
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.resume();

let handler = (_req, res) => { res.statusCode = 503; res.end(); };
const server = http.createServer((req, res) => handler(req, res));
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: CLIENT_ID,
    client_secret: CLIENT_SECRET,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://localhost:4242/'],
    scope: SCOPE,
  }],
  scopes: SCOPE.split(' '),
  cookies: { keys: ['bench-only-cookie-key'] },
  features: { devInteractions: { enabled: false } },
  // A refresh keeps its refresh token, so every oidc-agent request is alike.
  rotateRefreshToken: false,
  ttl: { AccessToken: 3600, RefreshToken: 86400, Grant: 86400 },
});
handler = provider.callback();

const grant = new provider.Grant({ accountId: 'bench-user', clientId: CLIENT_ID });
grant.addOIDCScope(SCOPE);
const grantId = await grant.save();
const client = await provider.Client.find(CLIENT_ID);
const refresh = new provider.RefreshToken({
  accountId: 'bench-user',
  client,
  grantId,
  scope: SCOPE,
  gty: 'authorization_code',
  authTime: Math.floor(Date.now() / 1000),
});
const rt = await refresh.save();

process.stdout.write(`READY ${issuer} ${CLIENT_ID} ${CLIENT_SECRET} ${rt}\n`);
