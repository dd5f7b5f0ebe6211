"use strict";
/**
 * fedstream documents (docs/serialization.md) with the stock @msgpack/msgpack library plus an extension
 * handler for types 1–5:
 *
 *   encode(value) → Uint8Array          decode(bytes, {copy, maxDepth, maxValues}) → value
 *
 * JavaScript ↔ msgpack:
 *   null · boolean · string            nil · bool · str
 *   number (integer / not)             int (smallest format) / float 64; Float64 forces float 64
 *   bigint (int64 / uint64 range)      int; decoded ints outside ±2⁵³ come back as bigint
 *   Uint8Array (Buffer)                bin (decoded as a zero-copy view unless copy: true)
 *   Array / Tuple                      array / ext 4
 *   plain object / Map / OrderedDict   map (str keys) / map (str or int keys) / ext 5
 *   NDArray                            ext 1, 2 or 3 by its `kind`
 *
 * Two things @msgpack/msgpack does not do on its own, done here through its documented seams:
 *  - map keys keep their type (int 1 ≠ "1") and their order: `mapKeyConverter` turns every key into a
 *    fresh Symbol (objects keep symbol keys in insertion order) and a pass after decoding rebuilds each
 *    map as an object or a Map (values.js);
 *  - it writes JavaScript Maps, int keys, Float64 and 64-bit ints in the smallest format: a small
 *    Encoder subclass (its protected write methods are stable within the locked 3.x version).
 * Arrays of 512 data bytes or more are written as ext 32 through @msgpack/msgpack's position-aware
 * extension form; from 1 KiB their data starts at a multiple of 64 bytes from the document start, as
 * Python writes them (smaller arrays use the smallest ext format that fits).
 */
const { Encoder, Decoder, ExtData } = require("@msgpack/msgpack");
const { DecodeError, EncodeError } = require("../errors.js");
const { NDArray, encodeLayout, decodeLayout, EXT_OF_KIND, EXT32_MIN_BYTES } = require("./ndarray.js");
const { Tuple, OrderedDict, Float64, isIndexLike } = require("./values.js");

const DEFAULT_MAX_DEPTH = 100;
const DEFAULT_MAX_VALUES = 10_000_000;
const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/** Marker the extension decoder returns for ext 4/5: finished by `finish` once the depth is known. */
class RawExt {
  constructor(type, value, at) {
    this.type = type;
    this.value = value;
    this.at = at;
  }
}

class FedEncoder extends Encoder {
  encodeObject(object, depth) {
    if (object instanceof Float64) {
      this.writeU8(0xcb);
      this.writeF64(object.value);
    } else if (object instanceof Map && !(object instanceof OrderedDict)) {
      this.encodeEntries(object, depth);
    } else {
      super.encodeObject(object, depth);
    }
  }

  encodeEntries(map, depth) {
    const size = map.size;
    if (size < 16) this.writeU8(0x80 + size);
    else if (size < 0x10000) {
      this.writeU8(0xde);
      this.writeU16(size);
    } else {
      this.writeU8(0xdf);
      this.writeU32(size);
    }
    for (const [key, value] of map) {
      this.doEncode(key, depth + 1);
      this.doEncode(value, depth + 1);
    }
  }

  /** Safe integers beyond 32 bits: as 64-bit ints (the library would write them as floats). */
  encodeNumber(n) {
    if (Number.isSafeInteger(n) && (n >= 2 ** 32 || n < -(2 ** 31))) this.encodeBigInt64(BigInt(n));
    else super.encodeNumber(n);
  }

  /** bigints that fit 32 bits: in the smallest format, like every other msgpack encoder. */
  encodeBigInt64(b) {
    if (b >= -(2n ** 31n) && b < 2n ** 32n) super.encodeNumber(Number(b));
    else super.encodeBigInt64(b);
  }
}

function newEncoder(base) {
  return new FedEncoder({ extensionCodec: EXTENSIONS, context: { base }, useBigInt64: true, maxDepth: Infinity });
}

/** The extension handler (ExtensionCodecType of @msgpack/msgpack). */
const EXTENSIONS = {
  tryToEncode(object, ctx) {
    if (object instanceof NDArray) {
      const type = EXT_OF_KIND[object.kind];
      if (object.nbytes >= EXT32_MIN_BYTES) return new ExtData(type, (pos) => encodeLayout(object, ctx.base + pos));
      return new ExtData(type, encodeLayout(object, null));
    }
    if (object instanceof Tuple) {
      return new ExtData(4, (pos) => newEncoder(ctx.base + pos).encode(Array.from(object)));
    }
    if (object instanceof OrderedDict) {
      return new ExtData(5, (pos) => newEncoder(ctx.base + pos).encode(new Map(object)));
    }
    return null;
  },

  decode(data, type, ctx) {
    const at = data.byteOffset - ctx.start;
    if (type >= 1 && type <= 3) return decodeLayout(data, type, at, ctx.copy);
    if (type === 4 || type === 5) {
      if (ctx.extDepth >= ctx.maxDepth) throw new DecodeError(`nesting deeper than ${ctx.maxDepth} at offset ${at}`);
      ctx.extDepth += 1;
      try {
        return new RawExt(type, rawDecode(data, ctx), at);
      } finally {
        ctx.extDepth -= 1;
      }
    }
    throw new DecodeError(`unknown msgpack ext type ${type} at offset ${at}; fedstream uses types 1 to 5`);
  },
};

function describe(value) {
  if (value === null) return "null";
  if (typeof value !== "object" && typeof value !== "function") return typeof value;
  return value.constructor ? value.constructor.name : "Object";
}

function keyRepr(key) {
  return typeof key === "string" ? JSON.stringify(key) : String(key);
}

/** Refuse, with the type and the path, anything that has no fedstream encoding. */
function check(value, path, depth) {
  if (depth > DEFAULT_MAX_DEPTH) throw new EncodeError(`nesting deeper than ${DEFAULT_MAX_DEPTH} at ${path}`);
  const t = typeof value;
  if (value === null || t === "boolean" || t === "string" || t === "number") return;
  if (t === "bigint") {
    if (value < INT64_MIN || value > UINT64_MAX) throw new EncodeError(`integer ${value} is outside 64 bits at ${path}`);
    return;
  }
  if (value instanceof NDArray || value instanceof Float64 || value instanceof Uint8Array) return;
  if (Array.isArray(value)) {
    value.forEach((item, i) => check(item, `${path}[${i}]`, depth + 1));
    return;
  }
  if (value instanceof Map) {
    for (const [key, item] of value) {
      const ok = typeof key === "string" || Number.isSafeInteger(key)
        || (typeof key === "bigint" && key >= INT64_MIN && key <= UINT64_MAX);
      if (!ok) throw new EncodeError(`map key of type ${describe(key)} at ${path}; keys must be strings or integers`);
      check(item, `${path}[${keyRepr(key)}]`, depth + 1);
    }
    return;
  }
  const proto = t === "object" ? Object.getPrototypeOf(value) : undefined;
  if (proto === Object.prototype || proto === null) {
    for (const key of Object.keys(value)) check(value[key], `${path}[${keyRepr(key)}]`, depth + 1);
    return;
  }
  throw new EncodeError(`cannot encode object of type ${describe(value)} at ${path}`);
}

/** One fedstream msgpack document for `value`. */
function encode(value) {
  check(value, "obj", 1);
  return newEncoder(0).encode(value);
}

function rawDecode(bytes, ctx) {
  const limit = bytes.byteLength;
  const decoder = new Decoder({
    extensionCodec: EXTENSIONS,
    context: ctx,
    useBigInt64: true,
    maxStrLength: limit,
    maxBinLength: limit,
    maxArrayLength: limit,
    maxMapLength: limit,
    maxExtLength: limit,
    mapKeyConverter: (key) => {
      if (typeof key !== "string" && typeof key !== "number" && typeof key !== "bigint") {
        throw new DecodeError(`map key of type ${describe(key)}; keys must be str or int`);
      }
      const sym = Symbol("key");
      ctx.keys.set(sym, typeof key === "bigint" ? normalizeInt(key) : key);
      return sym;
    },
  });
  return decoder.decode(bytes);
}

function normalizeInt(b) {
  return b >= BigInt(Number.MIN_SAFE_INTEGER) && b <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(b) : b;
}

/** Second pass: bounds, int normalisation, maps rebuilt with their real keys, tuples and ordered dicts. */
function finish(raw, ctx, depth) {
  ctx.count += 1;
  if (ctx.count > ctx.maxValues) throw new DecodeError(`more than ${ctx.maxValues} values`);
  if (raw === null || typeof raw !== "object") return typeof raw === "bigint" ? normalizeInt(raw) : raw;
  if (raw instanceof NDArray) return raw;
  if (raw instanceof Uint8Array) return ctx.copy ? Uint8Array.prototype.slice.call(raw) : raw;
  if (depth > ctx.maxDepth) throw new DecodeError(`nesting deeper than ${ctx.maxDepth}`);
  if (raw instanceof RawExt) {
    const inner = raw.value;
    if (raw.type === 4) {
      if (!Array.isArray(inner)) throw new DecodeError(`ext type 4 at offset ${raw.at} must hold one msgpack array`);
      return Tuple.from(inner.map((item) => finish(item, ctx, depth + 1)));
    }
    if (inner === null || Object.getPrototypeOf(inner) !== Object.prototype || Array.isArray(inner)) {
      throw new DecodeError(`ext type 5 at offset ${raw.at} must hold one msgpack map`);
    }
    return finishMap(inner, ctx, depth, new OrderedDict());
  }
  if (Array.isArray(raw)) {
    for (let i = 0; i < raw.length; i++) raw[i] = finish(raw[i], ctx, depth + 1);
    return raw;
  }
  return finishMap(raw, ctx, depth, null);
}

function finishMap(raw, ctx, depth, into) {
  const symbols = Object.getOwnPropertySymbols(raw);
  const keys = symbols.map((s) => ctx.keys.get(s));
  const seen = new Set();
  for (const key of keys) {
    if (seen.has(key)) throw new DecodeError(`duplicate map key ${keyRepr(key)}`);
    seen.add(key);
  }
  const plain = into === null && keys.every((k) => typeof k === "string" && !isIndexLike(k));
  const out = plain ? {} : into || new Map();
  symbols.forEach((sym, i) => {
    const value = finish(raw[sym], ctx, depth + 1);
    if (plain) out[keys[i]] = value;
    else out.set(keys[i], value);
  });
  return out;
}

/**
 * Decode one fedstream document. Arrays are zero-copy views into `bytes` where byte order and alignment
 * allow, unless `copy` is true. Every failure is a DecodeError.
 */
function decode(bytes, { copy = false, maxDepth = DEFAULT_MAX_DEPTH, maxValues = DEFAULT_MAX_VALUES } = {}) {
  if (!(bytes instanceof Uint8Array)) throw new DecodeError(`expected a Uint8Array or Buffer, got ${describe(bytes)}`);
  const ctx = { start: bytes.byteOffset, copy, maxDepth, maxValues, extDepth: 0, keys: new Map(), count: 0 };
  let raw;
  try {
    raw = rawDecode(bytes, ctx);
  } catch (err) {
    if (err instanceof DecodeError) throw err;
    throw new DecodeError(`malformed msgpack document: ${err.message}`);
  }
  return finish(raw, ctx, 1);
}

module.exports = { encode, decode, DEFAULT_MAX_DEPTH, DEFAULT_MAX_VALUES };
