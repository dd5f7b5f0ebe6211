"use strict";
/**
 * The held-out split (docs/protocol.md §6, "The held-out split"): which samples a node keeps for validation,
 * the same in every language for the same (n, test_ratio, seed).
 *
 * Count: k = heldOutCount(n, ratio) = floor(n · ratio), a float product x just below its nearest integer
 * m (x < m ≤ x + 1e-12 · x) counting as m, so 0.29 of 100 is 29.
 * Order: SplitMix64's stream from `seed`. With γ = 0x9E3779B97F4A7C15 and
 *   mix(z): z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) · 0x94D049BB133111EB; z ^ (z >> 31)
 * (all mod 2^64), sample i (from 0) gets the key mix(seed + (i + 1) · γ mod 2^64); the k samples with the
 * smallest keys are held out. The keys are distinct (γ is odd, mix a bijection): no tie rule.
 */
const crypto = require("node:crypto");
const { TaskError } = require("../errors.js");

const MASK = (1n << 64n) - 1n;
const GAMMA = 0x9E3779B97F4A7C15n;
const TOLERANCE = 1e-12;

function mix(z) {
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & MASK;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & MASK;
  return z ^ (z >> 31n);
}

/** The keys of samples 0 .. n-1 from `seed` (a BigInt in [0, 2^64)). */
function splitKeys(n, seed) {
  const keys = new BigUint64Array(n);
  let z = seed;
  for (let i = 0; i < n; i++) {
    z = (z + GAMMA) & MASK;
    keys[i] = mix(z);
  }
  return keys;
}

/** Python's round(): half to even. */
function roundHalfEven(x) {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** floor(n · ratio), a product just below an integer counting as it (fedcore.plans.split.held_out_count). */
function heldOutCount(n, ratio) {
  const x = n * ratio;
  const nearest = roundHalfEven(x);
  if (x < nearest && nearest <= x + TOLERANCE * x) return nearest;
  return Math.floor(x);
}

/**
 * A seed from training_args as a BigInt: an integer number or bigint in [0, 2^64); null / undefined draws
 * a fresh one (another split at every task, as a Python node without a seed).
 */
function splitSeed(seed) {
  if (seed === null || seed === undefined) return crypto.randomBytes(8).readBigUInt64BE();
  const ok = (typeof seed === "bigint") || (typeof seed === "number" && Number.isSafeInteger(seed));
  const big = ok ? BigInt(seed) : -1n;
  if (big < 0n || big > MASK) throw new TaskError(`training_args.seed must be nil or an integer in [0, 2**64), got ${String(seed)}`);
  return big;
}

/**
 * {train, heldOut}: the indices 0 .. n-1 split as the module docstring says, each ascending.
 * @param {number} n samples
 * @param {number} ratio test_ratio in [0, 1)
 * @param {bigint|number|null} seed
 */
function heldOutIndices(n, ratio, seed) {
  if (typeof ratio !== "number" || !(ratio >= 0 && ratio < 1)) throw new TaskError(`training_args.test_ratio must be a number in [0, 1), got ${String(ratio)}`);
  const start = splitSeed(seed);
  const k = heldOutCount(n, ratio);
  const train = [];
  const heldOut = [];
  if (k === 0) {
    for (let i = 0; i < n; i++) train.push(i);
    return { train, heldOut };
  }
  const keys = splitKeys(n, start);
  const threshold = keys.slice().sort()[k - 1]; // the k-th smallest key; keys are distinct
  for (let i = 0; i < n; i++) (keys[i] <= threshold ? heldOut : train).push(i);
  return { train, heldOut };
}

module.exports = { heldOutCount, heldOutIndices, splitKeys, splitSeed, GAMMA };
