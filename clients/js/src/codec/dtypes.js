"use strict";
/**
 * The dtype strings of docs/serialization.md ("Array layout") and how their elements map to JavaScript
 * typed arrays, in both byte orders.
 *
 * A dtype string is byte order + kind + item size: "<f4" little-endian float32, ">i8" big-endian int64,
 * "|b1" bool. Elements are held in a typed array in the machine's order whatever the wire order:
 *
 *   |b1 |u1 → Uint8Array   |i1 → Int8Array    u2/i2 → (Ui|I)nt16Array   u4/i4 → (Ui|I)nt32Array
 *   u8/i8 → BigUint64Array / BigInt64Array    f4 → Float32Array   f8 → Float64Array
 *   f2 (IEEE half) and bf2 (bfloat16) → Float32Array, converted exactly (both are subsets of float32)
 *   c8 / c16 → Float32Array / Float64Array of 2 × size numbers: real, imaginary, real, ...
 */
const os = require("node:os");
const { DecodeError, EncodeError } = require("../errors.js");

const NATIVE_ORDER = os.endianness() === "LE" ? "<" : ">";

/** kind+size → element description. `lanes` is numbers per element (2 for complex). */
const KINDS = {
  b1: { Typed: Uint8Array, itemsize: 1, lanes: 1, wire: 1 },
  i1: { Typed: Int8Array, itemsize: 1, lanes: 1, wire: 1 },
  u1: { Typed: Uint8Array, itemsize: 1, lanes: 1, wire: 1 },
  i2: { Typed: Int16Array, itemsize: 2, lanes: 1, wire: 2 },
  u2: { Typed: Uint16Array, itemsize: 2, lanes: 1, wire: 2 },
  i4: { Typed: Int32Array, itemsize: 4, lanes: 1, wire: 4 },
  u4: { Typed: Uint32Array, itemsize: 4, lanes: 1, wire: 4 },
  i8: { Typed: BigInt64Array, itemsize: 8, lanes: 1, wire: 8 },
  u8: { Typed: BigUint64Array, itemsize: 8, lanes: 1, wire: 8 },
  f2: { Typed: Float32Array, itemsize: 2, lanes: 1, wire: 2, convert: "half" },
  bf2: { Typed: Float32Array, itemsize: 2, lanes: 1, wire: 2, convert: "bfloat16" },
  f4: { Typed: Float32Array, itemsize: 4, lanes: 1, wire: 4 },
  f8: { Typed: Float64Array, itemsize: 8, lanes: 1, wire: 8 },
  c8: { Typed: Float32Array, itemsize: 8, lanes: 2, wire: 4 },
  c16: { Typed: Float64Array, itemsize: 16, lanes: 2, wire: 8 },
};

const VALID = Object.keys(KINDS)
  .flatMap((k) => (KINDS[k].itemsize === 1 ? [`|${k}`] : [`<${k}`, `>${k}`]))
  .join(", ");

/**
 * Parse a dtype string. Returns {dtype, order, code, ...KINDS[code]}; `order` is "<", ">" or "|".
 * Throws `ErrorClass` (DecodeError or EncodeError) naming the string and the valid choices.
 */
function parseDtype(dtype, ErrorClass = DecodeError) {
  const order = dtype[0];
  const code = dtype.slice(1);
  const spec = Object.prototype.hasOwnProperty.call(KINDS, code) ? KINDS[code] : null;
  const orderOk = spec && (spec.itemsize === 1 ? order === "|" : order === "<" || order === ">");
  if (!orderOk) {
    throw new ErrorClass(`unsupported dtype ${JSON.stringify(dtype)}; valid dtypes: ${VALID}`);
  }
  return { dtype, order, code, ...spec };
}

/** Float32 bits ↔ IEEE half bits (round to nearest, ties to even; NaN stays NaN). */
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 0x1f) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

function floatToHalf(value) {
  f32[0] = value;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 | (mant >>> 13) : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let out = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && (out & 1))) out += 1;
    return sign | out;
  }
  let out = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && (out & 1))) out += 1; // may carry into the exponent: correct
  return sign | out;
}

function bfloat16ToFloat(b) {
  u32[0] = b << 16;
  return f32[0];
}

function floatToBfloat16(value) {
  f32[0] = value;
  const x = u32[0];
  if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff)) return (x >>> 16) | 0x40; // quiet NaN
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}

/** Copy `bytes` and reverse each `width`-byte group in place (Buffer.swap16/32/64). */
function swapped(bytes, width) {
  const copy = Buffer.from(bytes);
  if (width === 2) copy.swap16();
  else if (width === 4) copy.swap32();
  else if (width === 8) copy.swap64();
  return copy;
}

/**
 * Elements of `count` items of dtype `spec` from raw wire bytes (exactly count × itemsize of them).
 * A zero-copy view when the order is the machine's and the bytes are aligned for the element type and
 * `copy` is false; otherwise a fresh typed array.
 */
function valuesFromBytes(spec, bytes, count, copy) {
  const lanes = count * spec.lanes;
  const foreign = spec.order !== "|" && spec.order !== NATIVE_ORDER;
  if (spec.convert) {
    const raw = foreign ? swapped(bytes, 2) : Buffer.from(bytes);
    const src = new Uint16Array(raw.buffer, raw.byteOffset, lanes);
    const out = new Float32Array(lanes);
    const conv = spec.convert === "half" ? halfToFloat : bfloat16ToFloat;
    for (let i = 0; i < lanes; i++) out[i] = conv(src[i]);
    return out;
  }
  let source = bytes;
  if (foreign) source = swapped(bytes, spec.wire);
  else if (copy || source.byteOffset % spec.Typed.BYTES_PER_ELEMENT !== 0) source = Buffer.from(bytes);
  return new spec.Typed(source.buffer, source.byteOffset, lanes);
}

/** Raw wire bytes (a Uint8Array, zero-copy when no conversion is needed) from elements. */
function bytesFromValues(spec, values) {
  if (spec.convert) {
    const out = new Uint16Array(values.length);
    const conv = spec.convert === "half" ? floatToHalf : floatToBfloat16;
    for (let i = 0; i < values.length; i++) out[i] = conv(values[i]);
    const raw = new Uint8Array(out.buffer);
    return spec.order !== NATIVE_ORDER ? swapped(raw, 2) : raw;
  }
  const raw = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  if (spec.order !== "|" && spec.order !== NATIVE_ORDER) return swapped(raw, spec.wire);
  return raw;
}

/** Validate that `values` is the typed array a dtype needs. */
function checkValues(spec, values, size) {
  if (!(values instanceof spec.Typed)) {
    const got = values === null || values === undefined ? String(values) : values.constructor.name;
    throw new EncodeError(`dtype ${spec.dtype} needs a ${spec.Typed.name}, got ${got}`);
  }
  if (values.length !== size * spec.lanes) {
    throw new EncodeError(
      `dtype ${spec.dtype} with ${size} elements needs ${size * spec.lanes} values, got ${values.length}`,
    );
  }
}

module.exports = {
  KINDS, NATIVE_ORDER, parseDtype, valuesFromBytes, bytesFromValues, checkValues,
  halfToFloat, floatToHalf, bfloat16ToFloat, floatToBfloat16,
};
