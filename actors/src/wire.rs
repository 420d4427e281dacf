//! How a typed remote call (an rkyv payload and a typed reply port) rides
//! ractor_cluster's `SerializedMessage`, in one place for every actor
//! that takes calls from other nodes ([`crate::placement`],
//! [`crate::directory`]).
//!
//! ractor_cluster moves bytes: a call is `SerializedMessage::Call` with
//! the argument bytes and a reply port of bytes. On the caller's side
//! [`to_wire`] encodes the call and bridges the byte port back to the
//! caller's typed port (decoding, with bytecheck, what the peer
//! answers); on the receiver's side [`from_wire`] validates the argument
//! bytes and hands the actor a typed port whose answer is encoded back.
//! Bytes that do not validate are refused with a log line, never a
//! panic: the port is dropped, and the caller's call fails.

use ractor::RpcReplyPort;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use rkyv::rancor;
use rkyv::util::AlignedVec;
use schema::mesh::{decode_actor_payload_within, encode_actor_payload};

/// What rkyv needs to encode a payload.
pub trait Encode:
    for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >
{
}

impl<T> Encode for T where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >
{
}

/// Wait for `rx` as long as the port's timeout allows (forever without
/// one); `None` when the other side went away or the time ran out.
async fn wait<T>(
    rx: ractor::concurrency::OneshotReceiver<T>,
    timeout: Option<std::time::Duration>,
) -> Option<T> {
    match timeout {
        Some(t) => tokio::time::timeout(t, rx).await.ok()?.ok(),
        None => rx.await.ok(),
    }
}

/// The call `call` with typed port `reply`, as the message a session
/// sends under `variant`. Answers of more than `max` bytes are refused.
pub fn to_wire<C, R>(
    variant: &str,
    call: &C,
    reply: RpcReplyPort<R>,
    max: usize,
) -> Result<SerializedMessage, BoxedDowncastErr>
where
    C: Encode,
    R: rkyv::Archive + Send + 'static,
    R::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<R, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let args = encode_actor_payload(call).map_err(|_| BoxedDowncastErr)?;
    let (tx, rx) = ractor::concurrency::oneshot::<Vec<u8>>();
    let timeout = reply.get_timeout();
    let variant_name = variant.to_owned();
    tokio::spawn(async move {
        let Some(bytes) = wait(rx, timeout).await else {
            return;
        };
        match decode_actor_payload_within::<R>(&bytes, max) {
            Ok(answer) => {
                let _ = reply.send(answer);
            }
            // Dropping the port: the caller gets an error, not garbage.
            Err(e) => {
                tracing::warn!(variant = %variant_name, "malformed remote reply refused: {e}")
            }
        }
    });
    let port = match timeout {
        Some(t) => RpcReplyPort::from((tx, t)),
        None => RpcReplyPort::from(tx),
    };
    Ok(SerializedMessage::Call {
        variant: variant.to_owned(),
        args,
        reply: port,
        metadata: None,
    })
}

/// The call a session received, if it is a `variant` call whose
/// arguments validate as a `C` of at most `max` bytes: the call and a
/// typed port whose answer goes back encoded.
pub fn from_wire<C, R>(
    msg: SerializedMessage,
    variant: &str,
    max: usize,
) -> Result<(C, RpcReplyPort<R>), BoxedDowncastErr>
where
    C: rkyv::Archive,
    C::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<C, rkyv::api::high::HighDeserializer<rancor::Error>>,
    R: Encode + Send + 'static,
{
    let SerializedMessage::Call {
        variant: got,
        args,
        reply,
        ..
    } = msg
    else {
        tracing::warn!(variant, "remote message refused: not a call");
        return Err(BoxedDowncastErr);
    };
    if got != variant {
        tracing::warn!(variant = %got.escape_debug(), expected = variant, "remote message refused: unknown variant");
        return Err(BoxedDowncastErr);
    }
    let call = decode_actor_payload_within::<C>(&args, max).map_err(|e| {
        tracing::warn!(variant, "malformed remote call refused by bytecheck: {e}");
        BoxedDowncastErr
    })?;
    let (tx, rx) = ractor::concurrency::oneshot::<R>();
    let timeout = reply.get_timeout();
    tokio::spawn(async move {
        let Some(answer) = wait(rx, timeout).await else {
            return;
        };
        match encode_actor_payload(&answer) {
            Ok(bytes) => {
                let _ = reply.send(bytes);
            }
            Err(e) => tracing::warn!("encoding a remote reply: {e}"),
        }
    });
    let port = match timeout {
        Some(t) => RpcReplyPort::from((tx, t)),
        None => RpcReplyPort::from(tx),
    };
    Ok((call, port))
}
