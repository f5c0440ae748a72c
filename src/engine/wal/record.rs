//! The log's records: the [`Event`]s, their byte encoding, and the framing
//! `[payload length: u32][hash: u64][seq: u64][payload]` with its checksum.

use crate::core::SlotStep;

/// First bytes of every segment.
pub const MAGIC: &[u8; 8] = b"KFWAL\0\0\x01";
pub(super) const HEADER: usize = 4 + 8 + 8;
/// Largest payload accepted when reading (a batch of 65,537 inputs is about 600 kB).
const MAX_PAYLOAD: usize = 64 << 20;
/// One logged operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new stream takes a free slot.
    Open {
        /// The slot.
        slot: u32,
        /// The stream's name.
        name: String,
    },
    /// A stream is forgotten; its slot is freed.
    Close {
        /// The slot.
        slot: u32,
    },
    /// A slot's complete state is copied into another (a predict's scratch copy).
    Copy {
        /// From.
        src: u32,
        /// To.
        dst: u32,
    },
    /// One batched step.
    Step(Vec<SlotStep>),
    /// A stream's state is written to its file `generation` and its slot freed.
    Evict {
        /// The slot.
        slot: u32,
        /// The file's generation.
        generation: u64,
    },
    /// An evicted stream comes back into a free slot from its file.
    Load {
        /// The slot.
        slot: u32,
        /// The file's generation.
        generation: u64,
        /// The stream's name.
        name: String,
    },
    /// An evicted stream is forgotten.
    Forget {
        /// The stream's name.
        name: String,
    },
}

const OPEN: u8 = 1;
const CLOSE: u8 = 2;
const COPY: u8 = 3;
const STEP: u8 = 4;
const EVICT: u8 = 5;
const LOAD: u8 = 6;
const FORGET: u8 = 7;

impl Event {
    /// Appends the event's payload to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Event::Open { slot, name } => {
                out.push(OPEN);
                out.extend_from_slice(&slot.to_le_bytes());
                put_name(out, name);
            }
            Event::Close { slot } => {
                out.push(CLOSE);
                out.extend_from_slice(&slot.to_le_bytes());
            }
            Event::Copy { src, dst } => {
                out.push(COPY);
                out.extend_from_slice(&src.to_le_bytes());
                out.extend_from_slice(&dst.to_le_bytes());
            }
            Event::Step(inputs) => encode_step(inputs, out),
            Event::Evict { slot, generation } => {
                out.push(EVICT);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
            }
            Event::Load { slot, generation, name } => {
                out.push(LOAD);
                out.extend_from_slice(&slot.to_le_bytes());
                out.extend_from_slice(&generation.to_le_bytes());
                put_name(out, name);
            }
            Event::Forget { name } => {
                out.push(FORGET);
                put_name(out, name);
            }
        }
    }

    pub(super) fn decode(payload: &[u8]) -> Option<Event> {
        let mut r = Reader(payload);
        let event = match r.u8()? {
            OPEN => Event::Open { slot: r.u32()?, name: r.name()? },
            CLOSE => Event::Close { slot: r.u32()? },
            COPY => Event::Copy { src: r.u32()?, dst: r.u32()? },
            STEP => {
                let count = r.u32()? as usize;
                if count > payload.len() / 9 {
                    return None;
                }
                let mut inputs = Vec::with_capacity(count);
                for _ in 0..count {
                    let (slot, token, flags) = (r.u32()?, r.u32()?, r.u8()?);
                    if flags > 3 {
                        return None;
                    }
                    inputs.push(SlotStep {
                        slot: slot as usize,
                        token,
                        learn: flags & 1 != 0,
                        reset: flags & 2 != 0,
                    });
                }
                Event::Step(inputs)
            }
            EVICT => Event::Evict { slot: r.u32()?, generation: r.u64()? },
            LOAD => Event::Load { slot: r.u32()?, generation: r.u64()?, name: r.name()? },
            FORGET => Event::Forget { name: r.name()? },
            _ => return None,
        };
        r.0.is_empty().then_some(event)
    }
}

/// A step's payload, written without building an [`Event`] (the worker's hot path).
pub fn encode_step(inputs: &[SlotStep], out: &mut Vec<u8>) {
    out.push(STEP);
    out.extend_from_slice(&(inputs.len() as u32).to_le_bytes());
    for x in inputs {
        out.extend_from_slice(&(x.slot as u32).to_le_bytes());
        out.extend_from_slice(&x.token.to_le_bytes());
        out.push(u8::from(x.learn) | (u8::from(x.reset) << 1));
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn name(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn record_hash(seq: u64, payload: &[u8]) -> u64 {
    crate::engine::checksum::checksum([seq.to_le_bytes().as_slice(), payload])
}

/// Records being assembled by the worker, handed to the writer as one batch.
#[derive(Debug, Default)]
pub struct RecordBuf {
    bytes: Vec<u8>,
    payload: Vec<u8>,
    records: usize,
}

impl RecordBuf {
    /// Appends a record with sequence number `seq` whose payload `fill` writes.
    pub fn push(&mut self, seq: u64, fill: impl FnOnce(&mut Vec<u8>)) {
        self.payload.clear();
        fill(&mut self.payload);
        self.bytes.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&record_hash(seq, &self.payload).to_le_bytes());
        self.bytes.extend_from_slice(&seq.to_le_bytes());
        self.bytes.extend_from_slice(&self.payload);
        self.records += 1;
    }

    /// Appends an event.
    pub fn push_event(&mut self, seq: u64, event: &Event) {
        self.push(seq, |out| event.encode(out));
    }

    /// Whether no record is waiting.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Takes the assembled bytes, leaving the buffer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.records = 0;
        std::mem::take(&mut self.bytes)
    }
}

pub(super) fn parse_record(bytes: &[u8]) -> Option<(u64, &[u8], usize)> {
    if bytes.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    let hash = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let seq = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_PAYLOAD || bytes.len() < HEADER + len {
        return None;
    }
    let payload = &bytes[HEADER..HEADER + len];
    (record_hash(seq, payload) == hash).then_some((seq, payload, HEADER + len))
}
