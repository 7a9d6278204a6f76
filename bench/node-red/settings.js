// Node-RED settings for the benchmark: headless (no editor, no admin API), loopback only, quiet.
module.exports = {
  uiHost: "127.0.0.1",
  uiPort: Number(process.env.SLUICE_BENCH_PORT || 18082),
  httpAdminRoot: false,
  httpNodeRoot: "/",
  flowFile: "flows.json",
  credentialSecret: false,
  logging: { console: { level: "warn", metrics: false, audit: false } },
  editorTheme: { projects: { enabled: false } },
  functionExternalModules: false,
};
