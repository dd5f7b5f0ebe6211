"use strict";
/** Chunk framing (docs/protocol.md §5): every rule the receiver enforces, and resuming. */
const test = require("node:test");
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const { ChunkAssembler, payloadHeader, chunksOf, sha256 } = require("../src/wire/chunks.js");
const { PayloadError } = require("../src/errors.js");

const doc = crypto.randomBytes(10_000);

test("a document cut by chunksOf and assembled again is the same bytes, digest checked", () => {
  const header = payloadHeader(doc, 1024);
  assert.deepEqual([header.total_size, header.chunk_size, header.chunk_count, header.start_offset], [10_000, 1024, 10, 0]);
  assert.ok(header.sha256.equals(crypto.createHash("sha256").update(doc).digest()));
  const asm = new ChunkAssembler(header);
  const chunks = [...chunksOf(doc, 1024)];
  assert.equal(chunks.length, 10);
  assert.equal(chunks[9].data.length, 10_000 - 9 * 1024);
  assert.equal(chunks[3].data.buffer, doc.buffer, "chunks are views, not copies");
  for (const c of chunks) asm.add(c);
  assert.ok(asm.complete);
  assert.ok(asm.finish().equals(doc));
  assert.equal(asm.buffer.byteOffset, 0, "one buffer of its own: aligned array views");
});

test("an empty payload has no chunks and the digest of zero bytes", () => {
  const header = payloadHeader(Buffer.alloc(0), 1024);
  assert.equal(header.chunk_count, 0);
  assert.equal(new ChunkAssembler(header).finish().length, 0);
});

test("headers are checked against the limits and for consistency before allocating", () => {
  const h = payloadHeader(doc, 1024);
  assert.throws(() => new ChunkAssembler(h, { maxPayloadSize: 9999 }), /payload of 10000 bytes is over this node's limit of 9999/);
  assert.throws(() => new ChunkAssembler(h, { maxChunkSize: 512 }), /chunk_size 1024 is over this node's limit of 512/);
  assert.throws(() => new ChunkAssembler({ ...h, chunk_count: 9 }), /chunk_count 9 disagrees .* \(expected 10\)/);
  assert.throws(() => new ChunkAssembler({ ...h, chunk_size: 0 }), /chunk_size must be > 0/);
  assert.throws(() => new ChunkAssembler({ ...h, sha256: Buffer.alloc(31) }), /sha256 must be 32 bytes/);
  assert.throws(() => new ChunkAssembler({ ...h, start_offset: 1024, chunk_count: 9 }), /starts at offset 1024, expected 0/);
});

test("chunks out of order, empty, too large, past the end or short before the end are refused", () => {
  const h = payloadHeader(doc, 1024);
  const at = (offset, size) => ({ offset, data: doc.subarray(offset, offset + size) });
  const cases = [
    [at(1024, 1024), /chunk at offset 1024, expected 0/],
    [{ offset: 0, data: Buffer.alloc(0) }, /empty chunk at offset 0/],
    [{ offset: 0, data: Buffer.alloc(1025) }, /1025 bytes at offset 0 is over chunk_size 1024/],
    [at(0, 100), /short chunk of 100 bytes at offset 0 before the end/],
  ];
  for (const [chunk, why] of cases) assert.throws(() => new ChunkAssembler(h).add(chunk), (e) => e instanceof PayloadError && why.test(e.message));
  const asm = new ChunkAssembler(h);
  for (let o = 0; o < 9 * 1024; o += 1024) asm.add(at(o, 1024));
  assert.throws(() => asm.add({ offset: 9 * 1024, data: Buffer.alloc(1024) }), /ends past total_size 10000/);
});

test("a wrong digest or missing bytes fail finish()", () => {
  const h = { ...payloadHeader(doc, 4096), sha256: sha256(Buffer.from("other")) };
  const asm = new ChunkAssembler(h);
  for (const c of chunksOf(doc, 4096)) asm.add(c);
  assert.throws(() => asm.finish(), /SHA-256 mismatch/);
  const partial = new ChunkAssembler(payloadHeader(doc, 4096));
  partial.add(chunksOf(doc, 4096).next().value);
  assert.throws(() => partial.finish(), /transfer ended after 4096 of 10000 bytes/);
});

test("a broken transfer keeps whole chunks and resumes from keptOffset with the same payload", () => {
  const asm = new ChunkAssembler(payloadHeader(doc, 1024));
  const chunks = [...chunksOf(doc, 1024)];
  chunks.slice(0, 4).forEach((c) => asm.add(c));
  assert.equal(asm.keptOffset, 4096);
  assert.throws(() => asm.resume(payloadHeader(Buffer.concat([doc, Buffer.from("x")]), 1024, 4096)), /different payload/);
  assert.throws(() => asm.resume(payloadHeader(doc, 1024, 2048)), /starts at offset 2048, expected 4096/);
  asm.resume(payloadHeader(doc, 1024, 4096));
  for (const c of chunksOf(doc, 1024, 4096)) asm.add(c);
  assert.ok(asm.finish().equals(doc));
});

test("payloadHeader refuses a start offset that is not a chunk boundary", () => {
  assert.throws(() => payloadHeader(doc, 1024, 1000), /not a multiple of chunk_size 1024/);
  assert.equal(payloadHeader(doc, 1024, 8192).chunk_count, 2);
});
