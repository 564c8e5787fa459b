//! Arrow Flight on the gRPC port: `DoGet` streams the filter rows of a selection as Arrow
//! record batches (the export layout's filter columns plus `task` and `visual_category`), from
//! one consistent view, so pyarrow.flight clients pull data without files.
//!
//! The ticket is the selection: either JSON `{"where": "task = Classification"}` (also
//! accepted: `"expr"`), or the `--where` text itself; an empty ticket selects everything.
//! Every other Flight method answers UNIMPLEMENTED.

use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use filterdb_proto as pb;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::BoxStream;
use super::convert::{selection, status};
use crate::engine::Engine;

/// The Flight service.
#[derive(Clone)]
pub struct FlightExportService {
    engine: Arc<Engine>,
}

impl FlightExportService {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>) -> Self {
        FlightExportService { engine }
    }
}

/// The selection text a ticket carries.
pub fn ticket_expr(ticket: &[u8]) -> Result<String, Status> {
    let text = std::str::from_utf8(ticket)
        .map_err(|_| {
            Status::invalid_argument(
                "ticket: expected UTF-8 (JSON {\"where\": ...} or --where text)",
            )
        })?
        .trim();
    if !text.starts_with('{') {
        return Ok(text.to_string());
    }
    let v: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Status::invalid_argument(format!("ticket: invalid JSON: {e}")))?;
    match v.get("where").or_else(|| v.get("expr")) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Status::invalid_argument("ticket: `where` must be a string")),
    }
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "Flight {what} is not supported; use DoGet with a selection ticket"
    )))
}

#[tonic::async_trait]
impl FlightService for FlightExportService {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let expr = ticket_expr(&request.into_inner().ticket)?;
        let sel = pb::Selection {
            predicate: None,
            expr: expr.clone(),
        };
        let pred = selection(self.engine.vocabularies(), Some(&sel))?;
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(4);
        super::worker(move || {
            engine.filter_batches(&pred, &mut |b| {
                if let Ok(batch) = &b {
                    metrics::counter!("filterdb_flight_rows_total").increment(batch.num_rows() as u64);
                }
                let item = b.map_err(|e| FlightError::Tonic(Box::new(status(e))));
                tx.blocking_send(item).is_ok()
            });
        });
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(crate::export::filter_schema(true))
            .build(ReceiverStream::new(rx))
            .map(|r| r.map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("Handshake")
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("ListFlights")
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unimplemented("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented("GetSchema")
    }

    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        unimplemented("DoPut")
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange")
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction")
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("ListActions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_carry_json_or_text() {
        assert_eq!(
            ticket_expr(br#"{"where": "task = x"}"#).ok().as_deref(),
            Some("task = x")
        );
        assert_eq!(
            ticket_expr(br#"{"expr": "a = b"}"#).ok().as_deref(),
            Some("a = b")
        );
        assert_eq!(
            ticket_expr(b"  task = y ").ok().as_deref(),
            Some("task = y")
        );
        assert_eq!(ticket_expr(b"{}").ok().as_deref(), Some(""));
        assert!(ticket_expr(b"{bad").is_err());
        assert!(ticket_expr(&[0xff, 0xfe]).is_err());
    }
}
