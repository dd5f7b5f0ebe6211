"use strict";
/** The msgpack codec beyond the vectors: refusals with their messages, bounds, zero-copy, float16/bfloat16. */
const test = require("node:test");
const assert = require("node:assert/strict");
const { encode, decode, NDArray, Tuple, OrderedDict, Float64 } = require("../src/codec");
const { DecodeError, EncodeError, FedstreamError } = require("../src/errors.js");
const { halfToFloat, floatToHalf, bfloat16ToFloat, floatToBfloat16 } = require("../src/codec/dtypes.js");

const hex = (s) => Buffer.from(s.replace(/\s+/g, ""), "hex");

/** An ext 8 object: c7 len type payload. */
function ext8(type, payload) {
  return Buffer.concat([Buffer.from([0xc7, payload.length, type & 0xff]), payload]);
}

/** Array layout payload: L dtype ndim shape(u64 BE) P padding data. */
function layout(dtype, shape, data, pad = 0) {
  const head = Buffer.alloc(1 + dtype.length + 1 + 8 * shape.length + 1 + pad);
  let pos = head.writeUInt8(dtype.length, 0);
  pos += head.write(dtype, pos, "latin1");
  pos = head.writeUInt8(shape.length, pos);
  for (const d of shape) pos = head.writeBigUInt64BE(BigInt(d), pos);
  head.writeUInt8(pad, pos);
  return Buffer.concat([head, data]);
}

test("the worked example of docs/serialization.md decodes and re-encodes byte for byte", () => {
  const doc = hex("c7 16 01 03 3c 66 34 01 00 00 00 00 00 00 00 02 00 00 00 80 3f 00 00 00 40");
  const a = decode(doc);
  assert.ok(a instanceof NDArray);
  assert.deepEqual([a.dtype, a.shape, [...a.values]], ["<f4", [2], [1, 2]]);
  assert.deepEqual(Buffer.from(encode(a)), doc);
});

test("unknown ext types are refused with the type and the offset, the msgpack timestamp included", () => {
  assert.throws(() => decode(Buffer.concat([Buffer.from([0x91]), ext8(7, Buffer.from([1]))])),
    (e) => e instanceof DecodeError && /ext type 7 at offset 4/.test(e.message));
  assert.throws(() => decode(hex("d6 ff 00 00 00 00")), (e) => e instanceof DecodeError && /ext type -1/.test(e.message));
});

test("an array's data length must equal prod(shape) x itemsize", () => {
  const bad = ext8(1, layout("<f4", [3], Buffer.alloc(8)));
  assert.throws(() => decode(bad), /dtype <f4 shape \(3\) needs 12 data bytes, got 8/);
});

test("bad dtype strings are refused naming the valid ones", () => {
  for (const [dtype, why] of [["<f16", /unsupported dtype "<f16"/], ["<b1", /unsupported dtype "<b1"/], ["|f4", /unsupported/],
    ["O", /unsupported/]]) {
    assert.throws(() => decode(ext8(1, layout(dtype, [], Buffer.alloc(4)))), why);
  }
  assert.throws(() => decode(ext8(1, layout("<bf2", [1], Buffer.alloc(2)))), /allowed in ext type 3 only/);
  assert.throws(() => decode(ext8(2, layout("<f4", [1], Buffer.alloc(4)))), /a numpy scalar has ndim 0, got 1/);
  assert.throws(() => new NDArray(new Float32Array(1), [1], "<f3"), (e) => e instanceof EncodeError && /valid dtypes: \|b1/.test(e.message));
});

test("truncated documents, trailing bytes and bad map keys are DecodeErrors", () => {
  assert.throws(() => decode(hex("92 01")), DecodeError);
  assert.throws(() => decode(hex("01 02")), (e) => e instanceof DecodeError && /Extra 1/.test(e.message));
  assert.throws(() => decode(hex("81 c0 01")), /map key of type null/);
  assert.throws(() => decode(hex("82 a1 61 01 a1 61 02")), /duplicate map key "a"/);
  assert.throws(() => decode(hex("82 01 01 01 02")), /duplicate map key 1/);
  assert.throws(() => decode(hex("c7 02 01 00")), DecodeError); // ext shorter than its length
});

test("nesting is bounded, for lists and for tuples (no stack overflow)", () => {
  const lists = Buffer.concat([Buffer.alloc(150, 0x91), Buffer.from([0xc0])]);
  assert.throws(() => decode(lists), /nesting deeper than 100/);
  assert.doesNotThrow(() => decode(lists, { maxDepth: 200 }));
  let inner = Buffer.from([0x90]);
  for (let i = 0; i < 5000; i++) inner = Buffer.concat([Buffer.from([0xc9, 0, 0, 0, 0, 4]), Buffer.from([0x91]), inner]);
  for (let p = 0; p < inner.length;) { // fix the ext 32 lengths from the inside out
    if (inner[p] === 0xc9) inner.writeUInt32BE(inner.length - p - 6, p + 1);
    p += 7;
  }
  assert.throws(() => decode(inner), /nesting deeper than 100/);
  assert.throws(() => decode(hex("93 01 02 03"), { maxValues: 3 }), /more than 3 values/);
});

test("encoding refuses what has no fedstream encoding, naming the type and the path", () => {
  const cases = [
    [{ a: [1, new Date(0)] }, 'cannot encode object of type Date at obj["a"][1]'],
    [{ s: new Set([1]) }, 'cannot encode object of type Set at obj["s"]'],
    [[new Float32Array(2)], "cannot encode object of type Float32Array at obj[0]"],
    [{ u: undefined }, 'cannot encode object of type undefined at obj["u"]'],
    [{ f: () => 1 }, 'cannot encode object of type Function at obj["f"]'],
    [new Map([[1.5, 0]]), "map key of type number at obj; keys must be strings or integers"],
    [[2n ** 64n], "integer 18446744073709551616 is outside 64 bits at obj[0]"],
  ];
  for (const [value, message] of cases) {
    assert.throws(() => encode(value), (e) => e instanceof EncodeError && e instanceof TypeError
      && e instanceof FedstreamError && e.message === message, message);
  }
  const cyclic = [];
  cyclic.push(cyclic);
  assert.throws(() => encode(cyclic), /nesting deeper than 100/);
});

test("maps keep key types and order: plain objects for ordinary string keys, Map otherwise", () => {
  const m = new Map([[2, "two"], ["2", "str two"], ["b", null]]);
  const back = decode(encode({ m, o: { z: 1, a: 2 }, idx: new Map([["10", 1], ["2", 2]]) }));
  assert.deepEqual([...back.m.entries()], [[2, "two"], ["2", "str two"], ["b", null]]);
  assert.deepEqual(Object.keys(back.o), ["z", "a"]);
  assert.ok(back.idx instanceof Map, "integer-like string keys would be reordered by a JS object");
  assert.deepEqual([...back.idx.keys()], ["10", "2"]);
  const od = decode(encode(new OrderedDict([["w", 1], [3, 2]])));
  assert.ok(od instanceof OrderedDict);
  assert.deepEqual([...od.entries()], [["w", 1], [3, 2]]);
});

test("tuples, Float64, 64-bit ints and bins round-trip with their msgpack types", () => {
  const value = [Tuple.of(1, Tuple.of()), new Float64(1), new Float64(-0), 2 ** 40, -(2 ** 40), 2n ** 63n, -(2n ** 63n), 5n,
    new Uint8Array([1, 2])];
  const bytes = Buffer.from(encode(value));
  const back = decode(bytes);
  assert.ok(back[0] instanceof Tuple && back[0][1] instanceof Tuple);
  assert.ok(Object.is(back[1], 1) && Object.is(back[2], -0));
  assert.equal(bytes[bytes.indexOf(0xcb)], 0xcb, "Float64(1) is a float 64");
  assert.deepEqual(back.slice(3, 8), [2 ** 40, -(2 ** 40), 2n ** 63n, -(2n ** 63n), 5]);
  assert.deepEqual([...back[8]], [1, 2]);
  assert.deepEqual(Buffer.from(encode(2 ** 40)), hex("cf 00 00 01 00 00 00 00 00"), "not a float");
  assert.deepEqual(Buffer.from(encode(5n)), hex("05"), "smallest format");
});

test("arrays are zero-copy views into an aligned document unless copy: true", () => {
  const a = new NDArray(Float64Array.from({ length: 256 }, (_, i) => i), [16, 16], "<f8");
  const doc = Buffer.from(encode({ a }));
  const aligned = Buffer.alloc(doc.length);
  doc.copy(aligned);
  const view = decode(aligned).a;
  assert.equal(view.values.buffer, aligned.buffer);
  assert.equal(view.values.byteOffset % 64, 0, "data starts at a multiple of 64");
  const copied = decode(aligned, { copy: true }).a;
  assert.notEqual(copied.values.buffer, aligned.buffer);
  assert.deepEqual([...copied.values], [...a.values]);
});

test("big-endian arrays decode to machine-order values and encode back big-endian", () => {
  const a = new NDArray(Int32Array.from([1, -2, 70000]), [3], ">i4");
  assert.deepEqual(Buffer.from(a.toBytes()), hex("00000001 fffffffe 00011170"));
  const back = decode(encode(a));
  assert.equal(back.dtype, ">i4");
  assert.deepEqual([...back.values], [1, -2, 70000]);
});

test("float16: every bit pattern survives half -> float32 -> half", () => {
  for (let h = 0; h < 0x10000; h++) {
    const f = halfToFloat(h);
    const back = floatToHalf(f);
    if (Number.isNaN(f)) assert.ok(Number.isNaN(halfToFloat(back)));
    else assert.equal(back, h, `half 0x${h.toString(16)}`);
  }
});

test("float16 and bfloat16 round to nearest, ties to even", () => {
  assert.equal(floatToHalf(1 + 2 ** -11), 0x3c00); // tie between 1 and 1+2^-10: even (1)
  assert.equal(floatToHalf(1 + 3 * 2 ** -11), 0x3c02); // tie: rounds up to even
  assert.equal(floatToHalf(65520), 0x7c00); // overflows to inf
  assert.equal(floatToHalf(2 ** -25), 0x0000); // tie with the smallest subnormal: even (0)
  assert.equal(floatToHalf(1.5 * 2 ** -24), 0x0002); // tie between subnormals 1 and 2: even
  assert.equal(floatToBfloat16(1 + 2 ** -8), 0x3f80); // tie: even
  assert.equal(floatToBfloat16(1 + 3 * 2 ** -8), 0x3f82);
  assert.equal(bfloat16ToFloat(0x4049), 3.140625);
  assert.ok(Number.isNaN(bfloat16ToFloat(floatToBfloat16(NaN))));
});

test("the error tree: EncodeError is a TypeError and a FedstreamError; siblings stay apart", () => {
  const { PayloadError, TaskError } = require("../src/errors.js");
  assert.ok(new EncodeError("x") instanceof FedstreamError && new EncodeError("x") instanceof TypeError);
  assert.ok(new DecodeError("x") instanceof FedstreamError && !(new DecodeError("x") instanceof TypeError));
  assert.ok(!(new DecodeError("x") instanceof PayloadError) && !(new TaskError("x") instanceof DecodeError));
  assert.ok(!(new Error("x") instanceof FedstreamError) && !(new TypeError("x") instanceof FedstreamError));
});
