//! `process.Process`: start processes as sandbox users, attach to them,
//! feed them input and signal them — the service behind the E2B SDK's
//! `commands` and `pty` modules.
//!
//! Semantics copied from E2B's envd: a process is not killed when the client
//! of its `Start` stream goes away (background commands), it can be
//! re-attached with `Connect`, and a `Start` with `Connect-Timeout-Ms` kills
//! the process when that deadline passes.

mod pty;
mod spawn;
mod table;

use std::sync::Arc;

use futures_util::{Stream, StreamExt, stream};
use schema::envd::process::{
    CloseStdinRequest, CloseStdinResponse, ConnectRequest, ConnectResponse, ListRequest,
    ListResponse, ProcessEvent, SendInputRequest, SendInputResponse, SendSignalRequest,
    SendSignalResponse, Signal, StartRequest, StartResponse, StreamInputRequest,
    StreamInputResponse, UpdateRequest, UpdateResponse, process_event, stream_input_request,
};

use crate::State;
use crate::connect::{self, ConnectError, Context, MessageStream};
use table::{ProcessTable, Subscription};

/// The `process.Process` methods, sharing one process table.
pub fn router(state: Arc<State>) -> connect::Router {
    let svc = Arc::new(Service {
        state,
        table: Arc::new(ProcessTable::default()),
    });
    // Each method's closure owns a handle on the service.
    let (start, attach, list, send_input) = (svc.clone(), svc.clone(), svc.clone(), svc.clone());
    let (stream_input, send_signal, update, close_stdin) =
        (svc.clone(), svc.clone(), svc.clone(), svc);
    connect::Router::new()
        .server_stream("process.Process/Start", move |ctx, req| {
            start.clone().start(ctx, req)
        })
        .server_stream("process.Process/Connect", move |ctx, req| {
            attach.clone().attach(ctx, req)
        })
        .unary("process.Process/List", move |_ctx, _req: ListRequest| {
            let processes = list.table.list();
            async move { Ok(ListResponse { processes }) }
        })
        .unary("process.Process/SendInput", move |_ctx, req| {
            send_input.clone().send_input(req)
        })
        .client_stream("process.Process/StreamInput", move |_ctx, reqs| {
            stream_input.clone().stream_input(reqs)
        })
        .unary("process.Process/SendSignal", move |_ctx, req| {
            send_signal.clone().send_signal(req)
        })
        .unary("process.Process/Update", move |_ctx, req| {
            update.clone().update(req)
        })
        .unary("process.Process/CloseStdin", move |_ctx, req| {
            close_stdin.clone().close_stdin(req)
        })
}

struct Service {
    state: Arc<State>,
    table: Arc<ProcessTable>,
}

impl Service {
    /// `Start`: spawn, then stream `start{pid}`, output, and `end`.
    async fn start(
        self: Arc<Self>,
        ctx: Context,
        req: StartRequest,
    ) -> Result<MessageStream<StartResponse>, ConnectError> {
        let user = self.state.user(ctx.basic_user()?.as_deref())?;
        let (handle, subscription) = spawn::start(&self.state, &self.table, &user, req)?;
        if let Some(deadline) = ctx.deadline {
            // The request's timeout bounds the process itself, as in E2B's
            // envd (the stream alone would end at the deadline and leave the
            // process running).
            let handle = handle.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline.into()) => {
                        tracing::info!(pid = handle.pid, "request deadline passed: killing the process");
                        if let Err(e) = handle.signal(libc::SIGKILL) {
                            tracing::warn!(pid = handle.pid, "killing at the deadline: {e}");
                        }
                    }
                    () = handle.wait_ended() => {}
                }
            });
        }
        let events = events(handle.pid, subscription)
            .map(|r| r.map(|event| StartResponse { event: Some(event) }));
        Ok(connect::with_keepalive(
            Box::pin(events),
            ctx.keepalive,
            || StartResponse {
                event: Some(keepalive()),
            },
        ))
    }

    /// `Connect`: attach to a running process (by pid or tag). Leaving does
    /// not affect the process.
    async fn attach(
        self: Arc<Self>,
        ctx: Context,
        req: ConnectRequest,
    ) -> Result<MessageStream<ConnectResponse>, ConnectError> {
        let handle = self.table.find(req.process.as_ref())?;
        let events = events(handle.pid, handle.subscribe())
            .map(|r| r.map(|event| ConnectResponse { event: Some(event) }));
        Ok(connect::with_keepalive(
            Box::pin(events),
            ctx.keepalive,
            || ConnectResponse {
                event: Some(keepalive()),
            },
        ))
    }

    async fn send_input(
        self: Arc<Self>,
        req: SendInputRequest,
    ) -> Result<SendInputResponse, ConnectError> {
        let process = self.table.find(req.process.as_ref())?;
        process
            .write_input(req.input.as_ref().and_then(|i| i.input.as_ref()))
            .await?;
        Ok(SendInputResponse {})
    }

    /// `StreamInput`: `start{process}` names the process, then each
    /// `data{input}` is written to it in order.
    async fn stream_input(
        self: Arc<Self>,
        mut reqs: MessageStream<StreamInputRequest>,
    ) -> Result<StreamInputResponse, ConnectError> {
        let mut process = None;
        while let Some(req) = reqs.next().await {
            match req?.event {
                Some(stream_input_request::Event::Start(start)) => {
                    process = Some(self.table.find(start.process.as_ref())?);
                }
                Some(stream_input_request::Event::Data(data)) => {
                    let p = process.as_ref().ok_or_else(|| {
                        ConnectError::invalid_argument(
                            "input data came before the start message naming the process",
                        )
                    })?;
                    p.write_input(data.input.as_ref().and_then(|i| i.input.as_ref()))
                        .await?;
                }
                Some(stream_input_request::Event::Keepalive(_)) | None => {}
            }
        }
        Ok(StreamInputResponse {})
    }

    async fn send_signal(
        self: Arc<Self>,
        req: SendSignalRequest,
    ) -> Result<SendSignalResponse, ConnectError> {
        let signal = match Signal::try_from(req.signal) {
            Ok(Signal::Sigterm) => libc::SIGTERM,
            Ok(Signal::Sigkill) => libc::SIGKILL,
            _ => {
                return Err(ConnectError::invalid_argument(format!(
                    "unsupported signal {}: use SIGNAL_SIGTERM or SIGNAL_SIGKILL",
                    req.signal
                )));
            }
        };
        self.table.find(req.process.as_ref())?.signal(signal)?;
        Ok(SendSignalResponse {})
    }

    /// `Update`: resize the PTY (the only thing that can be updated).
    async fn update(self: Arc<Self>, req: UpdateRequest) -> Result<UpdateResponse, ConnectError> {
        let process = self.table.find(req.process.as_ref())?;
        if let Some(pty) = req.pty {
            let size = pty.size.unwrap_or_default();
            let dim = |v: u32, what: &str| {
                u16::try_from(v).map_err(|_| {
                    ConnectError::invalid_argument(format!("PTY {what} {v} is too large"))
                })
            };
            process.resize(dim(size.cols, "cols")?, dim(size.rows, "rows")?)?;
        }
        Ok(UpdateResponse {})
    }

    async fn close_stdin(
        self: Arc<Self>,
        req: CloseStdinRequest,
    ) -> Result<CloseStdinResponse, ConnectError> {
        self.table.find(req.process.as_ref())?.close_stdin().await?;
        Ok(CloseStdinResponse {})
    }
}

/// The events an attached client sees: `start{pid}` first (the SDK insists),
/// then output, then exactly one `end`.
fn events(
    pid: u32,
    subscription: Subscription,
) -> impl Stream<Item = Result<ProcessEvent, ConnectError>> + Send {
    let start = ProcessEvent {
        event: Some(process_event::Event::Start(process_event::StartEvent {
            pid,
        })),
    };
    let rest = match subscription {
        Subscription::Ended(end) => stream::iter([Ok(ProcessEvent {
            event: Some(process_event::Event::End(end)),
        })])
        .boxed(),
        Subscription::Live(rx) => stream::unfold(Some(rx), |rx| async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(event) => {
                    let last = matches!(event.event, Some(process_event::Event::End(_)));
                    Some((Ok(event), (!last).then_some(rx)))
                }
                None => Some((
                    Err(ConnectError::internal(
                        "envd lost track of the process before it ended",
                    )),
                    None,
                )),
            }
        })
        .boxed(),
    };
    stream::once(std::future::ready(Ok(start))).chain(rest)
}

fn keepalive() -> ProcessEvent {
    ProcessEvent {
        event: Some(process_event::Event::Keepalive(process_event::KeepAlive {})),
    }
}
