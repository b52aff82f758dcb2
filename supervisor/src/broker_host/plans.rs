//! The tools' compiled profiles: each profile of the policy in force compiled once (its seccomp
//! program, mounts, Landlock rules, limits), on its first tool, and reused by every later tool
//! until the policy is replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use carapace_broker::sync::lock;
use carapace_policy::{Diagnostics, Plan, Policy, Target};

/// The plans of the policy in force, by profile name.
///
/// Keyed by the policy's identity: the broker hands every request the `Arc` of the policy it
/// was decided under, one `Arc` per load, and [`PlanCache::replace`] is told of each load (at
/// start and on reload). A request decided under any other policy (one replaced while it was
/// being decided) gets a plan compiled from its own policy, not cached, so a tool never runs
/// under a plan of a policy other than its decision's.
#[derive(Debug, Default)]
pub struct PlanCache {
    current: Mutex<Option<Plans>>,
}

#[derive(Debug)]
struct Plans {
    policy: Arc<Policy>,
    target: Target,
    by_profile: HashMap<String, Arc<Plan>>,
}

impl PlanCache {
    /// Put `policy` in force: the plans of the previous one are dropped.
    pub fn replace(&self, policy: Arc<Policy>, target: Target) {
        *lock(&self.current) = Some(Plans {
            policy,
            target,
            by_profile: HashMap::new(),
        });
    }

    /// The plan of `profile` in `policy` for `target`: compiled on its first use while
    /// `policy` is the one in force, the same plan after that. Errors are not kept (the next
    /// request compiles again and gets the same error).
    pub fn plan(
        &self,
        policy: &Arc<Policy>,
        profile: &str,
        target: &Target,
    ) -> Result<Arc<Plan>, Diagnostics> {
        let in_force = |p: &Plans| Arc::ptr_eq(&p.policy, policy) && p.target == *target;
        if let Some(plan) = lock(&self.current)
            .as_ref()
            .filter(|p| in_force(p))
            .and_then(|p| p.by_profile.get(profile))
        {
            return Ok(plan.clone());
        }
        // Compiled outside the lock: tools of other profiles are not held up by it.
        let plan = Arc::new(policy.compile(profile, target)?);
        let mut current = lock(&self.current);
        match current.as_mut().filter(|p| in_force(p)) {
            // Another tool may have compiled it meanwhile: the first one stays.
            Some(p) => Ok(p
                .by_profile
                .entry(profile.to_string())
                .or_insert(plan)
                .clone()),
            None => Ok(plan),
        }
    }

    /// How many plans are kept now (for tests and diagnostics).
    pub fn len(&self) -> usize {
        lock(&self.current)
            .as_ref()
            .map_or(0, |p| p.by_profile.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str =
        "version = 1\n[profiles.tool]\nwhy = \"t\"\n[profiles.tool.limits]\npids = 10\n";
    const B: &str = "version = 1\n[profiles.tool]\nwhy = \"t\"\n[profiles.tool.limits]\npids = 20\n[profiles.other]\nwhy = \"o\"\n";

    fn policy(text: &str) -> Arc<Policy> {
        Arc::new(Policy::parse(text, "p.toml").expect("test policy"))
    }

    const T: Target = Target { landlock_abi: 6 };

    #[test]
    fn a_profile_is_compiled_once_per_policy_load() {
        let cache = PlanCache::default();
        let a = policy(A);
        cache.replace(a.clone(), T);
        let first = cache.plan(&a, "tool", &T).unwrap();
        assert_eq!(*first, a.compile("tool", &T).unwrap());
        let again = cache.plan(&a, "tool", &T).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "compiled a second time");
        assert_eq!(cache.len(), 1);
        // Another target is not served from the cache.
        let other = Target { landlock_abi: 5 };
        let p = cache.plan(&a, "tool", &other).unwrap();
        assert!(!Arc::ptr_eq(&first, &p));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_reload_gives_the_new_policys_plan_both_ways() {
        let cache = PlanCache::default();
        let (a, b) = (policy(A), policy(B));
        assert_ne!(
            a.compile("tool", &T).unwrap(),
            b.compile("tool", &T).unwrap()
        );
        cache.replace(a.clone(), T);
        assert_eq!(
            *cache.plan(&a, "tool", &T).unwrap(),
            a.compile("tool", &T).unwrap()
        );
        // A -> B: B's plan, not A's kept one.
        cache.replace(b.clone(), T);
        assert!(cache.is_empty());
        assert_eq!(
            *cache.plan(&b, "tool", &T).unwrap(),
            b.compile("tool", &T).unwrap()
        );
        assert!(cache.plan(&b, "other", &T).is_ok());
        // B -> A again (a new load of the same text): A's plan, and `other` is gone.
        let a2 = policy(A);
        cache.replace(a2.clone(), T);
        assert_eq!(
            *cache.plan(&a2, "tool", &T).unwrap(),
            a.compile("tool", &T).unwrap()
        );
        let e = cache.plan(&a2, "other", &T).unwrap_err();
        assert!(e.to_string().contains("no profile named `other`"), "{e}");
    }

    #[test]
    fn a_request_under_a_replaced_policy_gets_its_own_policys_plan_uncached() {
        let cache = PlanCache::default();
        let (a, b) = (policy(A), policy(B));
        cache.replace(b.clone(), T);
        let cached_b = cache.plan(&b, "tool", &T).unwrap();
        // Decided under A before B was put in force: A's plan, and B's cache is untouched.
        assert_eq!(
            *cache.plan(&a, "tool", &T).unwrap(),
            a.compile("tool", &T).unwrap()
        );
        assert_eq!(cache.len(), 1);
        assert!(Arc::ptr_eq(&cached_b, &cache.plan(&b, "tool", &T).unwrap()));
        // Nothing in force yet: compiled, not kept.
        let empty = PlanCache::default();
        assert!(empty.plan(&a, "tool", &T).is_ok());
        assert!(empty.is_empty());
    }
}
