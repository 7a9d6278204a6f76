//! RFC 9457 `application/problem+json` bodies for every error the HTTP source answers with.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use sluice_core::{ErrorKind, ProcessError};

use super::FullBody;

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One problem document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    /// A URI naming the class of problem.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short summary of the class.
    pub title: String,
    /// The HTTP status, repeated for clients that only see the body.
    pub status: u16,
    /// What happened to this request.
    pub detail: String,
    /// The flow step that failed, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The Sluice error kind (`timeout`, `remote`, ...), when the flow failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The id of the message the request became, to find it in logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

impl Problem {
    /// A problem of class `slug` (becomes `urn:sluice:problem:<slug>`) with `status`.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Problem {
            type_uri: format!("urn:sluice:problem:{slug}"),
            title: status
                .canonical_reason()
                .unwrap_or("Unknown Status")
                .to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            step: None,
            kind: None,
            message_id: None,
        }
    }

    /// The problem for a flow that failed with `error` while handling message `message_id`.
    pub fn from_error(error: &ProcessError, message_id: &str) -> Self {
        let status = status_for(error.kind);
        let mut problem = Problem::new(status, error.kind.as_str(), error.detail.clone());
        problem.step = error.step.clone();
        problem.kind = Some(error.kind.as_str().to_owned());
        problem.message_id = Some(message_id.to_owned());
        problem
    }

    /// The HTTP status.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The response carrying this problem.
    pub fn into_response(self) -> Response<FullBody> {
        let status = self.status_code();
        // A struct of strings and numbers always serializes; the fallback keeps the response valid.
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = Response::new(FullBody::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Backpressure (a full disk, an open circuit): worth retrying, a little later.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The status the HTTP source answers for a flow that failed with `kind`.
pub fn status_for(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Remote => StatusCode::BAD_GATEWAY,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Expression | ErrorKind::Io | ErrorKind::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_statuses() {
        let cases = [
            (ErrorKind::InvalidInput, 400),
            (ErrorKind::Rejected, 422),
            (ErrorKind::Timeout, 504),
            (ErrorKind::Remote, 502),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Expression, 500),
            (ErrorKind::Io, 500),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in cases {
            assert_eq!(status_for(kind).as_u16(), status, "{kind}");
        }
    }

    #[test]
    fn problem_body_has_the_rfc_fields_and_ours() {
        let err =
            ProcessError::new(ErrorKind::Rejected, "order total is negative").in_step("check");
        let p = Problem::from_error(&err, "0190");
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "urn:sluice:problem:rejected",
                "title": "Unprocessable Entity",
                "status": 422,
                "detail": "order total is negative",
                "step": "check",
                "kind": "rejected",
                "message_id": "0190",
            })
        );
        let plain =
            serde_json::to_value(Problem::new(StatusCode::NOT_FOUND, "not_found", "x")).unwrap();
        assert!(plain.get("kind").is_none());
    }
}
