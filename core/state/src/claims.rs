//! Who owns each client id (SPEC section 10): with authentication on, a
//! client id belongs to the principal that first said `hello` with it.
//! A claim is a command like any other, so ownership is logged, survives a
//! restart and is the same on every replica. Each client id is claimed on
//! the shard its id is placed on.
//!
//! Bounded without a clock: past [`CLAIMS_MAX`] ids in a shard, the id
//! claimed longest ago (by the order of claims, a counter in the state) is
//! forgotten and may be claimed by anyone. A fleet that makes a new random
//! id per run would otherwise grow it without end.

use std::collections::BTreeMap;

use deadbolt_proto::{ErrorCode, Okay, Outcome, ServerError};
use serde::{Deserialize, Serialize};

use crate::hasher::StableHasher;
use crate::image::ImageError;

/// Client ids a shard remembers with their owners (about 100 bytes each)
/// before the one claimed longest ago is forgotten.
pub const CLAIMS_MAX: usize = 1 << 16;

/// The owners of the client ids placed on one shard.
#[derive(Debug, Default)]
pub struct Claims {
    /// Each owned id: its principal and the number of its latest claim.
    owners: BTreeMap<String, Owner>,
    /// The ids by the number of their latest claim, oldest first.
    by_order: BTreeMap<u64, String>,
    /// The number of the next claim.
    next: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    principal: String,
    order: u64,
}

/// One owned client id, as an image holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimImage {
    /// The client id.
    pub client: String,
    /// The principal that owns it.
    pub principal: String,
    /// The number of its latest claim.
    pub order: u64,
}

/// A shard's claims, as an image holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimsImage {
    /// The number of the next claim.
    pub next: u64,
    /// Every owned id, oldest claim first.
    pub claims: Vec<ClaimImage>,
}

impl Claims {
    /// `principal` claims `client`: ok if nobody owns it (it does now) or
    /// `principal` does already; `unauthorized` if another principal does,
    /// and then nothing changes.
    pub fn claim(&mut self, client: &str, principal: &str) -> Outcome {
        if let Some(owner) = self.owners.get(client)
            && owner.principal != principal
        {
            return Err(ServerError::new(
                ErrorCode::Unauthorized,
                format!("client id `{client}` belongs to another principal"),
            ));
        }
        let order = self.next;
        self.next += 1;
        let previous = self.owners.insert(
            client.to_owned(),
            Owner {
                principal: principal.to_owned(),
                order,
            },
        );
        if let Some(previous) = previous {
            self.by_order.remove(&previous.order);
        }
        self.by_order.insert(order, client.to_owned());
        while self.owners.len() > CLAIMS_MAX {
            self.forget_oldest();
        }
        Ok(Okay::EMPTY)
    }

    /// The principal that owns `client`, if one does.
    pub fn owner(&self, client: &str) -> Option<&str> {
        self.owners.get(client).map(|o| o.principal.as_str())
    }

    /// How many ids are owned.
    pub fn len(&self) -> usize {
        self.owners.len()
    }

    /// Whether no id is owned.
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    fn forget_oldest(&mut self) {
        if let Some((_, client)) = self.by_order.pop_first() {
            self.owners.remove(&client);
        }
    }

    /// Adds the claims to a digest of the shard.
    pub(crate) fn digest(&self, digest: &mut StableHasher) {
        digest.u64(self.next);
        digest.u64(self.owners.len() as u64);
        for (client, owner) in &self.owners {
            digest.str(client).str(&owner.principal).u64(owner.order);
        }
    }

    /// The claims as an image holds them.
    pub fn image(&self) -> ClaimsImage {
        let claims = self
            .by_order
            .iter()
            .map(|(&order, client)| ClaimImage {
                client: client.clone(),
                principal: self.owners[client].principal.clone(),
                order,
            })
            .collect();
        ClaimsImage {
            next: self.next,
            claims,
        }
    }

    /// The claims `image` describes; an id or a claim number twice, or a
    /// number not below `next`, is an error.
    pub fn from_image(image: ClaimsImage) -> Result<Claims, ImageError> {
        let mut claims = Claims {
            next: image.next,
            ..Claims::default()
        };
        for claim in image.claims {
            crate::image::check_issued("claim", claim.order, image.next)?;
            if claims.by_order.contains_key(&claim.order) {
                return Err(ImageError::Duplicate {
                    what: "claims",
                    name: claim.order.to_string(),
                });
            }
            let owner = Owner {
                principal: claim.principal,
                order: claim.order,
            };
            if claims.owners.insert(claim.client.clone(), owner).is_some() {
                return Err(ImageError::Duplicate {
                    what: "claimed client ids",
                    name: claim.client,
                });
            }
            claims.by_order.insert(claim.order, claim.client);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_claim_wins_and_the_same_principal_may_claim_again() {
        let mut claims = Claims::default();
        assert_eq!(claims.claim("c1", "a"), Ok(Okay::EMPTY));
        assert_eq!(claims.claim("c1", "a"), Ok(Okay::EMPTY));
        let refused = claims.claim("c1", "b").expect_err("owned by another");
        assert_eq!(refused.code, ErrorCode::Unauthorized);
        assert_eq!(claims.owner("c1"), Some("a"));
        assert_eq!(claims.len(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_claim_is_forgotten() {
        let mut claims = Claims::default();
        claims.claim("old", "a").expect("a free id");
        for i in 0..CLAIMS_MAX {
            claims.claim(&format!("c{i}"), "a").expect("a free id");
        }
        assert_eq!(claims.len(), CLAIMS_MAX);
        assert_eq!(claims.owner("old"), None);
        assert_eq!(claims.claim("old", "b"), Ok(Okay::EMPTY));
    }

    #[test]
    fn an_image_with_a_repeated_id_is_refused() {
        let claim = |order| ClaimImage {
            client: "c".into(),
            principal: "a".into(),
            order,
        };
        let image = ClaimsImage {
            next: 2,
            claims: vec![claim(0), claim(1)],
        };
        assert!(Claims::from_image(image).is_err());
    }
}
