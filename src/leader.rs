//! Leader election with a Lease: of several replicas only the holder reconciles.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    /// Unique per replica (the Pod name).
    pub identity: String,
    /// How long a lease stays valid without renewal: the longest a failover takes.
    pub lease_duration: Duration,
}

/// A held lease. `lost()` resolves when another replica may have taken over.
pub struct Leadership {
    state: watch::Receiver<bool>,
}

impl Leadership {
    pub async fn lost(mut self) {
        while *self.state.borrow_and_update() {
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Wait until this replica holds the lease.
pub async fn acquire(
    client: Client,
    config: LeaderConfig,
) -> Result<Leadership, kube_lease_manager::LeaseManagerError> {
    let duration = config.lease_duration.as_secs().max(2);
    let manager = LeaseManagerBuilder::new(client, config.lease_name)
        .with_namespace(config.namespace)
        .with_identity(config.identity)
        .with_duration(duration)
        // Renew well before expiry; this also bounds the clock skew tolerated between nodes.
        .with_grace((duration / 3).max(1))
        .build()
        .await?;
    let (mut state, task) = manager.watch().await;
    // The manager keeps the lease for as long as the channel is open.
    tokio::spawn(task);
    while !*state.borrow_and_update() {
        if state.changed().await.is_err() {
            break;
        }
    }
    Ok(Leadership { state })
}
