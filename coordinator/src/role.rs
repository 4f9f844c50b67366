//! The part this coordinator plays, owned in one place.
//!
//! Without etcd a coordinator always leads. With etcd it stands by until it is elected (its
//! clients' calls then go to the leader, see [`crate::forward`]), leads while elected, and once
//! told to stop it drains: it takes no new request, whatever the election says, and finishes
//! what it runs. Alongside: the election as seen from here (this coordinator's own address,
//! the leader's) and the one cached channel a standby forwards over.

use std::sync::Mutex;
use std::time::Duration;

use switchyard_net::grpc::{cluster_lazy, endpoint};
use tonic::transport::Channel;
use tonic::Status;
use tracing::info;

/// How long a standby waits to connect to the leader before `UNAVAILABLE`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves its own placement.
    Leading,
    /// Another coordinator leads; calls go there.
    Standby,
    /// Shutting down: no new requests; the ones running finish.
    Draining,
}

/// The role and the election, changed by membership and read by every API call.
#[derive(Debug)]
pub struct ProcessRole {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    role: Role,
    /// This coordinator's client API address, as it proclaims it.
    me: Option<String>,
    /// The elected leader's address; `None` when nobody leads (or it is not known yet).
    leader: Option<String>,
    /// Why the leader is not known (etcd cannot be read), if so.
    trouble: Option<String>,
    channel: Option<(String, Channel)>,
}

/// Where a standby sends a call: its own address, the leader's and a channel to it.
#[derive(Debug)]
pub struct Target {
    pub me: String,
    pub leader: String,
    pub channel: Channel,
}

impl Default for ProcessRole {
    fn default() -> Self {
        ProcessRole {
            state: Mutex::new(State {
                role: Role::Leading,
                me: None,
                leader: None,
                trouble: None,
                channel: None,
            }),
        }
    }
}

impl ProcessRole {
    pub fn get(&self) -> Role {
        self.state.lock().expect("not poisoned").role
    }

    /// Leads (`true`) or stands by; a draining coordinator stays draining.
    pub fn set_leading(&self, leading: bool) {
        let mut s = self.state.lock().expect("not poisoned");
        if s.role != Role::Draining {
            s.role = match leading {
                true => Role::Leading,
                false => Role::Standby,
            };
        }
    }

    /// From now on, no new requests.
    pub fn drain(&self) {
        self.state.lock().expect("not poisoned").role = Role::Draining;
    }

    /// This coordinator's own address: never a target.
    pub fn set_me(&self, me: &str) {
        self.state.lock().expect("not poisoned").me = Some(me.to_string());
    }

    /// What the election says now: its leader, or why that is not known.
    pub fn set_leader(&self, leader: Option<String>, trouble: Option<String>) {
        let mut s = self.state.lock().expect("not poisoned");
        if s.leader != leader {
            info!(
                leader = leader.as_deref().unwrap_or("(none)"),
                "the elected leader"
            );
        }
        s.leader = leader;
        s.trouble = trouble;
    }

    /// The elected leader's address, as last seen.
    pub fn leader(&self) -> Option<String> {
        self.state.lock().expect("not poisoned").leader.clone()
    }

    /// Where a request a standby got goes: the leader and a channel to it, or why nowhere.
    /// `forwarded_by` is the marker the request came with, if any.
    pub fn target(&self, forwarded_by: Option<&str>) -> Result<Target, Status> {
        let mut s = self.state.lock().expect("not poisoned");
        let me = s.me.clone().unwrap_or_else(|| "(this coordinator)".into());
        let leader = s.leader.clone();
        let named = leader.as_deref().unwrap_or("none is elected");
        if let Some(from) = forwarded_by {
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby and got a request {from} already forwarded; \
                 it forwards no further (the leader it knows: {named})"
            )));
        }
        let Some(leader) = leader else {
            let why = s
                .trouble
                .as_deref()
                .map_or(String::new(), |t| format!(" ({t})"));
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby and no leader is elected{why}; retry shortly"
            )));
        };
        if s.me.as_deref() == Some(leader.as_str()) {
            return Err(Status::unavailable(format!(
                "coordinator {me} is a standby, yet the election names its own address as the \
                 leader (it is taking over, or an earlier run of it still holds the lease); \
                 retry shortly"
            )));
        }
        let channel = match &s.channel {
            Some((a, c)) if *a == leader => c.clone(),
            _ => {
                let c = leader_channel(&leader).map_err(|e| {
                    Status::unavailable(format!(
                        "coordinator {me} is a standby; the leader's address {leader:?} is unusable: {e}"
                    ))
                })?;
                s.channel = Some((leader.clone(), c.clone()));
                c
            }
        };
        Ok(Target {
            me,
            leader,
            channel,
        })
    }
}

/// The channel to the leader's client API: over mutual TLS with the cluster identity, when
/// this process has one (the leader's client port then needs a certificate the cluster CA
/// signed, and accepts the cluster CA's client certificates where it asks for any).
fn leader_channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(cluster_lazy(
        endpoint(address)?
            .connect_timeout(CONNECT_TIMEOUT)
            // A leader that vanishes without closing its connections is found out.
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_standby_forwards_once_never_to_itself_and_names_the_leader() {
        let relay = ProcessRole::default();
        relay.set_me("10.0.0.2:50051");

        // Nobody leads: UNAVAILABLE saying so, and why the election is unknown.
        relay.set_leader(None, Some("etcd did not answer".into()));
        let e = relay.target(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("no leader is elected"), "{e}");
        assert!(e.message().contains("etcd did not answer"), "{e}");

        // The election names this coordinator itself: never a forward to itself.
        relay.set_leader(Some("10.0.0.2:50051".into()), None);
        let e = relay.target(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("its own address"), "{e}");

        // A leader elsewhere: that is where requests go, over one cached channel.
        relay.set_leader(Some("10.0.0.1:50051".into()), None);
        let Target { me, leader, .. } = relay.target(None).unwrap();
        assert_eq!(
            (me.as_str(), leader.as_str()),
            ("10.0.0.2:50051", "10.0.0.1:50051")
        );

        // A request another standby already forwarded is refused, naming both.
        let e = relay.target(Some("by 10.0.0.3:50051")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("10.0.0.3:50051"), "{e}");
        assert!(e.message().contains("already forwarded"), "{e}");
        assert!(e.message().contains("10.0.0.1:50051"), "{e}");
    }
}
