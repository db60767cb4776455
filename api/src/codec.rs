//! The gRPC codec of the generated clients and servers: prost, with small initial buffers.
//!
//! tonic starts every stream's encode buffer and every streaming request's decode buffer at
//! 8 KiB. A control plane holds one Deltas stream per proxy, each with both, and most of its
//! messages after the first are a few hundred bytes: at 2,000 proxies these buffers were 33 MB
//! of a 150 MB heap (heaptrack, docs/benchmarks.md). Buffers still grow to whatever a message
//! needs (a full snapshot), so only the idle cost changes.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Where a stream's buffers start.
const INITIAL_BUFFER: usize = 512;
/// tonic's default: how much a stream encodes before it yields to the runtime.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// `tonic_prost::ProstCodec` with [`INITIAL_BUFFER`]-byte buffers.
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
