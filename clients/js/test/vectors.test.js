"use strict";
/**
 * The conformance vectors of tests/vectors (written by scripts/gen_vectors.py from the Python
 * serializer), checked both ways: decoding each .msgpack file gives the value its .json describes, and
 * encoding the described value — built from the readable "values", not from the raw hex — gives the
 * file's bytes exactly.
 */
const test = require("node:test");
const assert = require("node:assert/strict");
const fs = require("node:fs");
const path = require("node:path");
const { encode, decode, NDArray, Tuple, OrderedDict, Float64 } = require("../src/codec");
const { parseDtype } = require("../src/codec/dtypes.js");

const VECTORS = path.resolve(__dirname, "../../../tests/vectors");
const NAMES = fs.readdirSync(VECTORS).filter((f) => f.endsWith(".json")).map((f) => f.slice(0, -5)).sort();

function load(name) {
  const data = fs.readFileSync(path.join(VECTORS, `${name}.msgpack`));
  const doc = JSON.parse(fs.readFileSync(path.join(VECTORS, `${name}.json`), "utf8"));
  return { data, doc };
}

const hex = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("hex");

function float64Hex(x) {
  const b = Buffer.alloc(8);
  b.writeDoubleBE(x);
  return b.toString("hex");
}

function readableNumber(v) {
  if (v === "nan") return NaN;
  if (v === "inf") return Infinity;
  if (v === "-inf") return -Infinity;
  return v;
}

/** Typed-array lanes for readable values: 8-byte ints as BigInt, bools as 0/1, complex flattened. */
function lanes(node) {
  const code = node.dtype.slice(1);
  return node.values.flatMap((v) => {
    if (code === "i8" || code === "u8") return [BigInt(v)];
    if (code === "b1") return [v ? 1 : 0];
    if (Array.isArray(v)) return v.map(readableNumber);
    return [readableNumber(v)];
  });
}

function sameNumber(got, want, where) {
  if (Number.isNaN(want)) assert.ok(Number.isNaN(got), `${where}: ${got} is not NaN`);
  else assert.ok(Object.is(got, want), `${where}: ${got} !== ${want}`);
}

function buildKey(desc) {
  return build(desc);
}

/** The JavaScript value a description stands for. */
function build(desc) {
  switch (desc.type) {
    case "nil": return null;
    case "bool": return desc.value;
    case "str": return desc.value;
    case "int": {
      const b = BigInt(desc.value);
      return Number.isSafeInteger(Number(b)) && BigInt(Number(b)) === b ? Number(b) : b;
    }
    case "float": return new Float64(Buffer.from(desc.hex, "hex").readDoubleBE());
    case "bin": return new Uint8Array(Buffer.from(desc.hex, "hex"));
    case "list": return desc.items.map(build);
    case "tuple": return Tuple.from(desc.items.map(build));
    case "ordered_dict": return new OrderedDict(desc.items.map(([k, v]) => [buildKey(k), build(v)]));
    case "dict": {
      const entries = desc.items.map(([k, v]) => [buildKey(k), build(v)]);
      if (entries.every(([k]) => typeof k === "string" && !/^(0|[1-9][0-9]*)$/.test(k))) {
        return Object.fromEntries(entries);
      }
      return new Map(entries);
    }
    default: {
      const values = parseDtype(desc.dtype).Typed.from(lanes(desc));
      return new NDArray(values, desc.shape, desc.dtype, desc.type);
    }
  }
}

/** Assert that a decoded value is what the description says, node by node. */
function check(got, desc, where = "obj") {
  switch (desc.type) {
    case "nil": assert.equal(got, null, where); return;
    case "bool": case "str": assert.equal(got, desc.value, where); return;
    case "int":
      assert.ok(typeof got === "number" || typeof got === "bigint", `${where}: ${typeof got}`);
      assert.equal(BigInt(got), BigInt(desc.value), where);
      return;
    case "float": {
      assert.equal(typeof got, "number", where);
      const want = Buffer.from(desc.hex, "hex").readDoubleBE();
      if (Number.isNaN(want)) assert.ok(Number.isNaN(got), where);
      else assert.equal(float64Hex(got), desc.hex, where);
      return;
    }
    case "bin":
      assert.ok(got instanceof Uint8Array, where);
      assert.equal(hex(got), desc.hex, where);
      return;
    case "list": case "tuple":
      assert.ok(Array.isArray(got), `${where}: not an array`);
      assert.equal(got instanceof Tuple, desc.type === "tuple", `${where}: tuple-ness`);
      assert.equal(got.length, desc.items.length, `${where}: length`);
      desc.items.forEach((d, i) => check(got[i], d, `${where}[${i}]`));
      return;
    case "dict": case "ordered_dict": {
      assert.equal(got instanceof OrderedDict, desc.type === "ordered_dict", `${where}: OrderedDict-ness`);
      const entries = got instanceof Map ? [...got.entries()] : Object.entries(got);
      assert.equal(entries.length, desc.items.length, `${where}: size`);
      desc.items.forEach(([k, v], i) => {
        const [gk, gv] = entries[i];
        check(gk, k, `${where} key ${i}`);
        check(gv, v, `${where}[${JSON.stringify(k.value)}]`);
      });
      return;
    }
    default: {
      assert.ok(got instanceof NDArray, `${where}: not an NDArray`);
      assert.equal(got.kind, desc.type, `${where}: kind`);
      assert.equal(got.dtype, desc.dtype, `${where}: dtype`);
      assert.deepEqual(got.shape, desc.shape, `${where}: shape`);
      assert.equal(hex(got.toBytes()), desc.data, `${where}: raw bytes`);
      const want = lanes(desc);
      assert.equal(got.values.length, want.length, `${where}: number of values`);
      want.forEach((w, i) => {
        if (typeof w === "bigint") assert.equal(got.values[i], w, `${where}.values[${i}]`);
        else sameNumber(got.values[i], w, `${where}.values[${i}]`);
      });
    }
  }
}

test("there are vectors", () => {
  assert.ok(NAMES.length >= 50, `only ${NAMES.length} vectors in ${VECTORS}`);
});

for (const name of NAMES) {
  test(`vector ${name}: decoding the file gives the description`, () => {
    const { data, doc } = load(name);
    check(decode(data), doc.value);
    check(decode(data, { copy: true }), doc.value);
    // the same document at an odd address: array views would be misaligned, so they are copied
    const shifted = Buffer.alloc(data.length + 1);
    data.copy(shifted, 1);
    check(decode(shifted.subarray(1)), doc.value);
  });

  test(`vector ${name}: encoding the description gives the file bytes`, () => {
    const { data, doc } = load(name);
    assert.equal(doc.byte_exact, true);
    const got = Buffer.from(encode(build(doc.value)));
    assert.equal(got.toString("hex"), data.toString("hex"));
  });
}
