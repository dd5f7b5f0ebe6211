"use strict";
/**
 * Chunk framing of docs/protocol.md §5, both directions.
 *
 * Receiving: `ChunkAssembler` checks a PayloadHeader against the node's limits before allocating, then
 * writes every chunk at its offset into ONE preallocated Buffer (no concatenation), enforces order, sizes
 * and bounds, and verifies the SHA-256 of the whole document after the last chunk. A broken transfer keeps
 * the bytes received so far (`keptOffset`, a multiple of chunk_size) so it can resume.
 *
 * Sending: `payloadHeader(doc, chunkSize, startOffset)` and `chunksOf(doc, chunkSize, startOffset)`
 * (zero-copy views into the document).
 */
const crypto = require("node:crypto");
const { PayloadError } = require("../errors.js");

const MiB = 1024 * 1024;

function sha256(bytes) {
  return crypto.createHash("sha256").update(bytes).digest();
}

/** PayloadHeader for sending `doc` from `startOffset` (0 for a fresh transfer) in `chunkSize` chunks. */
function payloadHeader(doc, chunkSize, startOffset = 0, digest = null) {
  if (!Number.isInteger(chunkSize) || chunkSize <= 0) throw new PayloadError(`chunk_size must be > 0, got ${chunkSize}`);
  if (startOffset % chunkSize !== 0 || startOffset > doc.byteLength) {
    throw new PayloadError(`start_offset ${startOffset} is not a multiple of chunk_size ${chunkSize} within ${doc.byteLength} bytes`);
  }
  return {
    total_size: doc.byteLength,
    sha256: digest || sha256(doc),
    chunk_size: chunkSize,
    chunk_count: Math.ceil((doc.byteLength - startOffset) / chunkSize),
    start_offset: startOffset,
  };
}

/** The Chunk messages of `doc` from `startOffset`: views into `doc`, in order. */
function* chunksOf(doc, chunkSize, startOffset = 0) {
  const bytes = Buffer.from(doc.buffer, doc.byteOffset, doc.byteLength);
  for (let offset = startOffset; offset < bytes.length; offset += chunkSize) {
    yield { offset, data: bytes.subarray(offset, Math.min(offset + chunkSize, bytes.length)) };
  }
}

class ChunkAssembler {
  /**
   * @param {object} header PayloadHeader (total_size, sha256, chunk_size, chunk_count, start_offset)
   * @param {{maxPayloadSize?: number, maxChunkSize?: number}} limits what this receiver accepts
   */
  constructor(header, { maxPayloadSize = 4 * 1024 * MiB, maxChunkSize = 16 * MiB } = {}) {
    this.limits = { maxPayloadSize, maxChunkSize };
    ChunkAssembler.check(header, this.limits, 0);
    this.header = header;
    this.buffer = Buffer.allocUnsafeSlow(header.total_size); // own ArrayBuffer, offset 0: aligned views
    this.received = 0;
  }

  /** Validate a header against limits, before anything is allocated. */
  static check(header, { maxPayloadSize, maxChunkSize }, keptOffset) {
    const { total_size: total, chunk_size: size, chunk_count: count, start_offset: start } = header;
    if (!header.sha256 || header.sha256.length !== 32) {
      throw new PayloadError(`payload sha256 must be 32 bytes, got ${header.sha256 ? header.sha256.length : 0}`);
    }
    if (total > maxPayloadSize) throw new PayloadError(`payload of ${total} bytes is over this node's limit of ${maxPayloadSize}`);
    if (!(size > 0)) throw new PayloadError(`chunk_size must be > 0, got ${size}`);
    if (size > maxChunkSize) throw new PayloadError(`chunk_size ${size} is over this node's limit of ${maxChunkSize}`);
    if (start !== keptOffset) throw new PayloadError(`payload starts at offset ${start}, expected ${keptOffset}`);
    const want = Math.ceil((total - start) / size);
    if (count !== want) {
      throw new PayloadError(`chunk_count ${count} disagrees with total_size ${total}, start_offset ${start}, chunk_size ${size} (expected ${want})`);
    }
  }

  /** Bytes that can be kept when the transfer breaks (a multiple of chunk_size). */
  get keptOffset() {
    return this.received - (this.received % this.header.chunk_size);
  }

  get complete() {
    return this.received === this.header.total_size;
  }

  /** Continue after a break: `header` must describe the same payload, starting at keptOffset. */
  resume(header) {
    const h = this.header;
    if (header.total_size !== h.total_size || !Buffer.from(header.sha256).equals(Buffer.from(h.sha256))
      || header.chunk_size !== h.chunk_size) {
      throw new PayloadError("resumed transfer describes a different payload (size, digest or chunk size changed)");
    }
    ChunkAssembler.check(header, this.limits, this.keptOffset);
    this.received = this.keptOffset;
    this.header = header;
  }

  /** Write one Chunk {offset, data} at its place. */
  add(chunk) {
    const { offset, data } = chunk;
    const { total_size: total, chunk_size: size } = this.header;
    if (offset !== this.received) throw new PayloadError(`chunk at offset ${offset}, expected ${this.received}`);
    if (!data || data.length === 0) throw new PayloadError(`empty chunk at offset ${offset}`);
    if (data.length > size) throw new PayloadError(`chunk of ${data.length} bytes at offset ${offset} is over chunk_size ${size}`);
    if (offset + data.length > total) throw new PayloadError(`chunk at offset ${offset} ends past total_size ${total}`);
    if (data.length < size && offset + data.length !== total) {
      throw new PayloadError(`short chunk of ${data.length} bytes at offset ${offset} before the end`);
    }
    this.buffer.set(data, offset);
    this.received += data.length;
  }

  /** The verified document. Throws PayloadError when bytes are missing or the SHA-256 differs. */
  finish() {
    const { total_size: total, sha256: want } = this.header;
    if (this.received !== total) throw new PayloadError(`transfer ended after ${this.received} of ${total} bytes`);
    const got = sha256(this.buffer);
    if (!got.equals(Buffer.from(want))) {
      throw new PayloadError(`SHA-256 mismatch: header says ${Buffer.from(want).toString("hex")}, got ${got.toString("hex")}`);
    }
    return this.buffer;
  }
}

module.exports = { ChunkAssembler, payloadHeader, chunksOf, sha256, MiB };
