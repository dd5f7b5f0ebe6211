"use strict";
/**
 * JavaScript stand-ins for the Python values msgpack alone cannot tell apart:
 *
 *   Tuple        a Python tuple (ext type 4); an Array subclass, so it reads like an array
 *   OrderedDict  a collections.OrderedDict (ext type 5); a Map subclass
 *   Float64      a float that must stay a float64 on the wire even when integral (1.0, -0.0): a plain
 *                JavaScript number that is an integer is written as a msgpack int
 *
 * A plain msgpack map decodes to a plain object when every key is a string that a JavaScript object
 * keeps in insertion order (not an integer-like "12"), otherwise to a Map (int keys, "12"-like keys).
 */

class Tuple extends Array {
  /** tuple(1, 2) → Tuple [1, 2]; use this rather than `new Tuple(n)` (which is Array's length form). */
  static of(...items) {
    const t = new Tuple();
    t.push(...items);
    return t;
  }

  static from(iterable) {
    const t = new Tuple();
    for (const item of iterable) t.push(item);
    return t;
  }

  static get [Symbol.species]() {
    return Array;
  }
}

class OrderedDict extends Map {}

class Float64 {
  constructor(value) {
    this.value = Number(value);
  }

  valueOf() {
    return this.value;
  }
}

/** True for strings a JavaScript object would reorder (canonical array indices, 0 … 2³² − 2). */
function isIndexLike(key) {
  if (!/^(0|[1-9][0-9]*)$/.test(key)) return false;
  return Number(key) < 2 ** 32 - 1;
}

module.exports = { Tuple, OrderedDict, Float64, isIndexLike };
