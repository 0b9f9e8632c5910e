//! gRPC health: NOT_SERVING until the fleet is known, and again from the moment shutdown starts.

use tonic_health::{server::HealthReporter, ServingStatus};

/// Every service name a gateway or kubelet may probe: Dynamo's, GAIE's, and the ext_proc service.
pub const SERVICES: &[&str] = &[
    "",
    "inference-extension",
    "liveness",
    "readiness",
    "envoy.service.ext_proc.v3.ExternalProcessor",
];

pub async fn set(reporter: &HealthReporter, serving: bool) {
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for s in SERVICES {
        reporter.set_service_status(*s, status).await;
    }
}
