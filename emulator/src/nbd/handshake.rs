//! The fixed-newstyle handshake: greeting, client flags and option haggling up to
//! the point where transmission starts (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
//!
//! This module owns every decision the spec leaves to the server during
//! negotiation. It never touches export data.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::export::{Export, ExportSet};
use super::proto::{self, info, option, reply, tflag};
use super::MAX_PAYLOAD_BYTES;

/// Option payloads up to this size are read and parsed.
const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Option payloads up to this size are read, discarded and answered `ERR_TOO_BIG`;
/// anything larger is treated as abuse and the connection is dropped.
const MAX_DISCARDED_OPTION_BYTES: u32 = 16 * 1024 * 1024;
/// The context ID handed out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client and server agreed on.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Whether structured replies are on.
    pub structured_replies: bool,
    /// The context ID of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
    /// The transmission flags sent to the client.
    pub transmission_flags: u16,
}

/// Why a handshake ended without transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or closed.
    #[error("connection lost during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client set a flag we did not advertise.
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (the option has no
    /// way to report an error, so the spec says to disconnect).
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// An option payload too large to be anything but abuse.
    #[error("option {option} with {length} bytes of data is too large")]
    OptionTooLarge {
        /// Option code.
        option: u32,
        /// Claimed length.
        length: u32,
    },
    /// The client sent `NBD_OPT_ABORT`.
    #[error("client aborted the handshake")]
    Aborted,
    /// The server is shutting down.
    #[error("server is shutting down")]
    Shutdown,
}

/// The transmission flags for an export.
pub fn transmission_flags(export: &Export, structured_replies: bool) -> u16 {
    let mut flags = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::CAN_MULTI_CONN
        | tflag::SEND_CACHE;
    if structured_replies {
        flags |= tflag::SEND_DF;
    }
    if export.read_only {
        flags |= tflag::READ_ONLY;
    } else {
        flags |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
    }
    flags
}

struct State {
    structured_replies: bool,
    /// Export name the current meta-context selection was made for.
    meta_context: Option<String>,
    no_zeroes: bool,
}

/// Runs the handshake. `Ok` means transmission starts with what was agreed.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &ExportSet,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    writer.write_all(&greeting).await?;

    let client_flags = reader.read_u32().await?;
    let known = proto::CLIENT_FLAG_FIXED_NEWSTYLE | proto::CLIENT_FLAG_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::UnknownClientFlags(client_flags));
    }
    let mut state = State {
        structured_replies: false,
        meta_context: None,
        no_zeroes: client_flags & proto::CLIENT_FLAG_NO_ZEROES != 0,
    };

    let mut out = Vec::new();
    loop {
        let magic = reader.read_u64().await?;
        if magic != proto::IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let opt = reader.read_u32().await?;
        let length = reader.read_u32().await?;
        out.clear();
        if length > MAX_OPTION_BYTES {
            // EXPORT_NAME has no error reply: the session must end.
            if length > MAX_DISCARDED_OPTION_BYTES || opt == proto::option::EXPORT_NAME {
                return Err(HandshakeError::OptionTooLarge {
                    option: opt,
                    length,
                });
            }
            discard(reader, u64::from(length)).await?;
            tracing::debug!(option = opt, length, "option payload too large");
            proto::encode_option_reply(
                &mut out,
                opt,
                reply::ERR_TOO_BIG,
                b"option payload too large",
            );
            writer.write_all(&out).await?;
            continue;
        }
        let mut payload = vec![0u8; length as usize];
        reader.read_exact(&mut payload).await?;
        tracing::trace!(option = opt, length, "option");
        match handle_option(opt, &payload, exports, &mut state, &mut out) {
            Step::Continue => writer.write_all(&out).await?,
            Step::Abort => {
                writer.write_all(&out).await?;
                writer.flush().await?;
                return Err(HandshakeError::Aborted);
            }
            Step::UnknownExport(name) => return Err(HandshakeError::UnknownExport(name)),
            Step::Transmit(negotiated) => {
                writer.write_all(&out).await?;
                writer.flush().await?;
                return Ok(negotiated);
            }
        }
    }
}

async fn discard<R: AsyncBufRead + Unpin>(reader: &mut R, length: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(length), &mut tokio::io::sink()).await?;
    if copied < length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

enum Step {
    Continue,
    Abort,
    UnknownExport(String),
    Transmit(Negotiated),
}

fn handle_option(
    opt: u32,
    payload: &[u8],
    exports: &ExportSet,
    state: &mut State,
    out: &mut Vec<u8>,
) -> Step {
    let error = |out: &mut Vec<u8>, kind: u32, message: &str| {
        proto::encode_option_reply(out, opt, kind, message.as_bytes());
        Step::Continue
    };
    match opt {
        option::EXPORT_NAME => {
            let Ok(name) = std::str::from_utf8(payload) else {
                return Step::UnknownExport(String::from_utf8_lossy(payload).into_owned());
            };
            let Some(export) = exports.find(name) else {
                return Step::UnknownExport(name.to_owned());
            };
            let flags = transmission_flags(export, state.structured_replies);
            out.extend_from_slice(&export.device.size().to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            if !state.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Step::Transmit(negotiated(export, state, flags))
        }
        option::ABORT => {
            proto::encode_option_reply(out, opt, reply::ACK, &[]);
            Step::Abort
        }
        option::LIST => {
            if !payload.is_empty() {
                return error(out, reply::ERR_INVALID, "NBD_OPT_LIST takes no data");
            }
            for export in exports.iter() {
                let mut data = Vec::with_capacity(4 + export.name.len() + export.description.len());
                data.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                data.extend_from_slice(export.name.as_bytes());
                data.extend_from_slice(export.description.as_bytes());
                proto::encode_option_reply(out, opt, reply::SERVER, &data);
            }
            proto::encode_option_reply(out, opt, reply::ACK, &[]);
            Step::Continue
        }
        option::STARTTLS => error(out, reply::ERR_POLICY, "TLS is not offered by this server"),
        option::INFO | option::GO => {
            let request = match proto::parse_info_request(payload) {
                Ok(request) => request,
                Err(problem) => return error(out, reply::ERR_INVALID, &format!("{problem:?}")),
            };
            let Some(export) = exports.find(&request.name) else {
                return unknown_export(out, opt, exports, &request.name);
            };
            let flags = transmission_flags(export, state.structured_replies);
            let mut data = Vec::with_capacity(64);
            data.extend_from_slice(&info::EXPORT.to_be_bytes());
            data.extend_from_slice(&export.device.size().to_be_bytes());
            data.extend_from_slice(&flags.to_be_bytes());
            proto::encode_option_reply(out, opt, reply::INFO, &data);
            if request.requests.contains(&info::NAME) {
                data.clear();
                data.extend_from_slice(&info::NAME.to_be_bytes());
                data.extend_from_slice(export.name.as_bytes());
                proto::encode_option_reply(out, opt, reply::INFO, &data);
            }
            if request.requests.contains(&info::DESCRIPTION) {
                data.clear();
                data.extend_from_slice(&info::DESCRIPTION.to_be_bytes());
                data.extend_from_slice(export.description.as_bytes());
                proto::encode_option_reply(out, opt, reply::INFO, &data);
            }
            // Always sent: it only states what the server enforces anyway (no
            // alignment; requests above the maximum payload get EINVAL).
            data.clear();
            data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&4096u32.to_be_bytes());
            data.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
            proto::encode_option_reply(out, opt, reply::INFO, &data);
            proto::encode_option_reply(out, opt, reply::ACK, &[]);
            if opt == option::GO {
                Step::Transmit(negotiated(export, state, flags))
            } else {
                Step::Continue
            }
        }
        option::STRUCTURED_REPLY => {
            if !payload.is_empty() {
                return error(
                    out,
                    reply::ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                );
            }
            state.structured_replies = true;
            proto::encode_option_reply(out, opt, reply::ACK, &[]);
            Step::Continue
        }
        option::LIST_META_CONTEXT | option::SET_META_CONTEXT => {
            let is_set = opt == option::SET_META_CONTEXT;
            if is_set {
                // SET replaces the selection even when it fails.
                state.meta_context = None;
            }
            if !state.structured_replies {
                return error(
                    out,
                    reply::ERR_INVALID,
                    "negotiate structured replies first",
                );
            }
            let request = match proto::parse_meta_context_request(payload) {
                Ok(request) => request,
                Err(problem) => return error(out, reply::ERR_INVALID, &format!("{problem:?}")),
            };
            let Some(export) = exports.find(&request.name) else {
                return unknown_export(out, opt, exports, &request.name);
            };
            let matches = if is_set {
                request.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
            } else {
                request.queries.is_empty()
                    || request
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == proto::BASE_ALLOCATION)
            };
            if matches {
                let id = if is_set { BASE_ALLOCATION_ID } else { 0 };
                let mut data = id.to_be_bytes().to_vec();
                data.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                proto::encode_option_reply(out, opt, reply::META_CONTEXT, &data);
                if is_set {
                    state.meta_context = Some(export.name.clone());
                }
            }
            proto::encode_option_reply(out, opt, reply::ACK, &[]);
            Step::Continue
        }
        other => error(
            out,
            reply::ERR_UNSUP,
            &format!("option {other} is not supported"),
        ),
    }
}

/// An export this server does not serve: `NBD_REP_ERR_POLICY` with the reason
/// when it knows the name (a volume another controller owns: the reply names
/// it and where it is served), else `NBD_REP_ERR_UNKNOWN`.
fn unknown_export(out: &mut Vec<u8>, opt: u32, exports: &ExportSet, name: &str) -> Step {
    match exports.refusal(name) {
        Some(why) => proto::encode_option_reply(out, opt, reply::ERR_POLICY, why.as_bytes()),
        None => {
            let message = format!("no export named {name:?}");
            proto::encode_option_reply(out, opt, reply::ERR_UNKNOWN, message.as_bytes());
        }
    }
    Step::Continue
}

fn negotiated(export: &Arc<Export>, state: &State, flags: u16) -> Negotiated {
    let base_allocation = match &state.meta_context {
        Some(name) if *name == export.name && state.structured_replies => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Negotiated {
        export: Arc::clone(export),
        structured_replies: state.structured_replies,
        base_allocation,
        transmission_flags: flags,
    }
}
