"use strict";
/**
 * The held-out split against the shared vectors tests/vectors/split/held_out.json (written from fedcore's
 * split by tests/test_split_vectors.py): the same held-out indices, counts and first keys for every case.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { heldOutCount, heldOutIndices, splitKeys, splitSeed } = require("../src/training/split.js");
const { TaskError } = require("../src/errors.js");

const FILE = path.resolve(__dirname, "../../../tests/vectors/split/held_out.json");
const CASES = JSON.parse(fs.readFileSync(FILE, "utf8")).cases;

test("there are split vectors, edges included", () => {
  assert.ok(CASES.length >= 10, `${CASES.length} cases in ${FILE}`);
  const seeds = new Set(CASES.map((c) => c.seed));
  for (const s of ["0", "4294967295", "18446744073709551615"]) assert.ok(seeds.has(s), s);
});

for (const c of CASES) {
  test(`split n=${c.n} test_ratio=${c.test_ratio} seed=${c.seed}: the vector's held-out indices`, () => {
    assert.equal(heldOutCount(c.n, c.test_ratio), c.count);
    const keys = splitKeys(Math.min(c.n, c.first_keys.length), BigInt(c.seed));
    assert.deepEqual([...keys].map((k) => k.toString(16).padStart(16, "0")), c.first_keys);
    const { train, heldOut } = heldOutIndices(c.n, c.test_ratio, BigInt(c.seed));
    assert.deepEqual(heldOut, c.held_out);
    const rest = [];
    for (let i = 0; i < c.n; i++) if (!c.held_out.includes(i)) rest.push(i);
    assert.deepEqual(train, rest);
    if (BigInt(c.seed) <= BigInt(Number.MAX_SAFE_INTEGER)) {
      assert.deepEqual(heldOutIndices(c.n, c.test_ratio, Number(c.seed)).heldOut, c.held_out, "seed as a number");
    }
  });
}

test("no seed draws a fresh split each time", () => {
  const seen = new Set();
  for (let i = 0; i < 5; i++) seen.add(heldOutIndices(200, 0.5, null).heldOut.join(","));
  assert.ok(seen.size > 1);
});

test("a bad seed or ratio is a TaskError naming it", () => {
  for (const bad of [-1, 1.5, 2n ** 64n, "1", true]) {
    assert.throws(() => splitSeed(bad), (e) => e instanceof TaskError && e.message.includes(`got ${String(bad)}`));
  }
  for (const bad of [1, -0.1, NaN, "0.3"]) {
    assert.throws(() => heldOutIndices(10, bad, 1), (e) => e instanceof TaskError && /test_ratio must be a number in \[0, 1\)/.test(e.message));
  }
});
