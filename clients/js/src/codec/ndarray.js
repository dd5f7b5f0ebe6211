"use strict";
/**
 * NDArray: an n-d array as fedstream sends it (ext types 1, 2, 3 of docs/serialization.md), and the
 * array layout that carries it: L, dtype, ndim, shape (u64 big-endian), P, P zero bytes, C-order data.
 */
const { DecodeError, EncodeError } = require("../errors.js");
const { parseDtype, valuesFromBytes, bytesFromValues, checkValues } = require("./dtypes.js");

/** Which ext type carries which kind of array. */
const EXT_OF_KIND = { ndarray: 1, scalar: 2, tensor: 3 };
const KIND_OF_EXT = { 1: "ndarray", 2: "scalar", 3: "tensor" };
const MAX_NDIM = 32;
/** Arrays with this many data bytes or more start at a multiple of ALIGNMENT from the document start. */
const ALIGN_MIN_BYTES = 1024;
const ALIGNMENT = 64;
/** Arrays with this many data bytes or more are written as ext 32 (smaller ones: smallest ext format). */
const EXT32_MIN_BYTES = 512;

/**
 * An n-d array: `values` (a typed array in machine byte order, see dtypes.js), `shape` (numbers,
 * outermost first, [] for 0-d), `dtype` (wire dtype string, kept across a round trip, byte order
 * included) and `kind`: "ndarray" (numpy array, ext 1), "scalar" (numpy scalar, ext 2) or "tensor"
 * (torch tensor, ext 3).
 */
class NDArray {
  constructor(values, shape, dtype, kind = "ndarray") {
    const spec = parseDtype(dtype, EncodeError);
    if (!Object.prototype.hasOwnProperty.call(EXT_OF_KIND, kind)) {
      throw new EncodeError(`unknown array kind ${JSON.stringify(kind)}; valid: ndarray, scalar, tensor`);
    }
    if (!Array.isArray(shape) || shape.length > MAX_NDIM
      || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new EncodeError(`shape must be at most ${MAX_NDIM} non-negative integers, got ${JSON.stringify(shape)}`);
    }
    if (kind === "scalar" && shape.length !== 0) {
      throw new EncodeError(`a scalar has shape [], got ${JSON.stringify(shape)}`);
    }
    if (spec.code === "bf2" && kind !== "tensor") {
      throw new EncodeError(`dtype ${dtype} is for torch tensors only (kind "tensor"), got kind "${kind}"`);
    }
    const size = shape.reduce((a, b) => a * b, 1);
    checkValues(spec, values, size);
    this.values = values;
    this.shape = shape.slice();
    this.dtype = dtype;
    this.kind = kind;
    Object.defineProperty(this, "spec", { value: spec, enumerable: false });
  }

  /** A zero-filled array. */
  static zeros(shape, dtype, kind = "ndarray") {
    const spec = parseDtype(dtype, EncodeError);
    const size = shape.reduce((a, b) => a * b, 1);
    return new NDArray(new spec.Typed(size * spec.lanes), shape, dtype, kind);
  }

  /** Number of elements (product of the shape; 1 for 0-d). */
  get size() {
    return this.shape.reduce((a, b) => a * b, 1);
  }

  get ndim() {
    return this.shape.length;
  }

  /** Bytes per element on the wire. */
  get itemsize() {
    return this.spec.itemsize;
  }

  /** Bytes of data on the wire: size × itemsize. */
  get nbytes() {
    return this.size * this.spec.itemsize;
  }

  /** The data in wire order (the dtype's byte order), C order. */
  toBytes() {
    return bytesFromValues(this.spec, this.values);
  }
}

/** Bytes of the layout before the padding: L, dtype, ndim, shape, P. */
function headerSize(dtype, ndim) {
  return 1 + dtype.length + 1 + 8 * ndim + 1;
}

/**
 * The ext payload of `array` (layout of docs/serialization.md). `dataPos` is the absolute offset in the
 * document where this payload starts, or null for an ext format chosen by size (small arrays); arrays
 * of ALIGN_MIN_BYTES or more get the padding that puts their data at a multiple of ALIGNMENT.
 */
function encodeLayout(array, dataPos) {
  const head = headerSize(array.dtype, array.ndim);
  let pad = 0;
  if (dataPos !== null && array.nbytes >= ALIGN_MIN_BYTES) pad = (ALIGNMENT - ((dataPos + head) % ALIGNMENT)) % ALIGNMENT;
  const data = array.toBytes();
  const out = new Uint8Array(head + pad + data.byteLength);
  const view = new DataView(out.buffer);
  let pos = 0;
  out[pos++] = array.dtype.length;
  for (let i = 0; i < array.dtype.length; i++) out[pos++] = array.dtype.charCodeAt(i);
  out[pos++] = array.ndim;
  for (const d of array.shape) {
    view.setBigUint64(pos, BigInt(d), false);
    pos += 8;
  }
  out[pos++] = pad;
  pos += pad;
  out.set(data, pos);
  return out;
}

/**
 * Read an ext 1/2/3 payload. `data` is a view into the document; `at` is its absolute offset (for error
 * messages). The data length is checked against prod(shape) × itemsize before anything is allocated.
 */
function decodeLayout(data, extType, at, copy) {
  const fail = (why) => new DecodeError(`ext type ${extType} at offset ${at}: ${why}`);
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let pos = 0;
  const need = (n, what) => {
    if (pos + n > data.byteLength) throw fail(`truncated array header (${what})`);
  };
  need(1, "dtype length");
  const L = data[pos++];
  need(L, "dtype");
  let dtype = "";
  for (let i = 0; i < L; i++) {
    const c = data[pos++];
    if (c > 0x7e || c < 0x20) throw fail("dtype is not printable ASCII");
    dtype += String.fromCharCode(c);
  }
  let spec;
  try {
    spec = parseDtype(dtype, DecodeError);
  } catch (err) {
    throw fail(err.message);
  }
  const kind = KIND_OF_EXT[extType];
  if (spec.code === "bf2" && kind !== "tensor") throw fail(`dtype ${dtype} is allowed in ext type 3 only`);
  need(1, "ndim");
  const ndim = data[pos++];
  if (ndim > MAX_NDIM) throw fail(`ndim ${ndim} is over ${MAX_NDIM}`);
  if (kind === "scalar" && ndim !== 0) throw fail(`a numpy scalar has ndim 0, got ${ndim}`);
  need(8 * ndim, "shape");
  const shape = [];
  let size = 1n;
  for (let i = 0; i < ndim; i++) {
    const d = view.getBigUint64(pos, false);
    pos += 8;
    shape.push(d);
    size *= d;
  }
  need(1, "padding length");
  const pad = data[pos++];
  need(pad, "padding");
  pos += pad;
  const expected = size * BigInt(spec.itemsize);
  const got = BigInt(data.byteLength - pos);
  if (expected !== got) {
    throw fail(`dtype ${dtype} shape (${shape.join(", ")}) needs ${expected} data bytes, got ${got}`);
  }
  const count = Number(size);
  const values = valuesFromBytes(spec, data.subarray(pos), count, copy);
  return new NDArray(values, shape.map(Number), dtype, kind);
}

module.exports = {
  NDArray, encodeLayout, decodeLayout, EXT_OF_KIND, KIND_OF_EXT, ALIGN_MIN_BYTES, ALIGNMENT, EXT32_MIN_BYTES,
};
