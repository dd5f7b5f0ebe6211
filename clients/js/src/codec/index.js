"use strict";
/** fedstream documents in JavaScript: encode/decode and the value classes they use. */
const { encode, decode } = require("./msgpack.js");
const { NDArray } = require("./ndarray.js");
const { Tuple, OrderedDict, Float64 } = require("./values.js");

module.exports = { encode, decode, NDArray, Tuple, OrderedDict, Float64 };
