// The keys the tests use besides AUTH_TOKEN (the owner "default"): vitest.config.js puts their
// SHA-256 digests into API_KEYS and names "ops" in ADMIN_OWNERS, as an operator would.
export const KEYS = {
  alice: "alice-test-key-5b1d8e",
  bob: "bob-test-key-93c0aa",
  ops: "ops-admin-test-key-1f77",
};
export const ADMINS = ["ops"];

export function bearer(owner) {
  return { authorization: `Bearer ${KEYS[owner]}` };
}
